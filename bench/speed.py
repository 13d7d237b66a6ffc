"""Speed of fxquant's integer backend against FP32 and the int8 peers, on CPU (issue 6).

The one command (needs a quiet machine; about 15-30 minutes on 2 cores, most of it
compiling: fxquant calibration, torch.compile of the int graph and of PT2E per batch size):

    python -m bench.speed --write

Quiet means quiet: with 2 threads on a machine where other processes hold the cores, every
parallel op waits for a scheduler slice (measured: ~8 ms per op), which punishes the eager
int graph most (about 1,700 ops per ViT-B forward, one int8 GEMM per (batch, head) in
attention): a busy-machine run showed int eager at 0.23x FP32, a 1-thread run of the same
code 3.56x. A quick look while developing (few rounds; figures not for the record):

    python -m bench.speed --models deit_small_patch16_224 --batches 1 --rounds 2 --skip-peers

Per model (timm, random init after torch.manual_seed(0)), with 2 intra-op threads:

* ``fp32 eager``: the timm model.
* ``fxquant int, portable kernels`` (eager and under ``torch.compile``, inductor):
  ``fxquant.compile(model, "w8a8", backend="int", int_kernels="portable")`` on 32 seeded randn
  calibration images (batches of 8), run as the GraphModule it returns (torch ops only).
* ``fxquant int, default kernels (auto: oneDNN)`` (eager and under ``torch.compile``): the
  default ``fxquant.compile(model, "w8a8", backend="int")``, ``int_kernels="auto"``, which on an
  x86 CPU with oneDNN's int8 kernels puts the Linears on oneDNN's int8 kernel with the scales,
  GELU and the next point's quantization in the GEMM's epilogue, and each attention core into
  one fused C++ kernel (``fuse_int_attention``); its compile time is the one reported.
* ``fxquant fqvit_w8a8 int eager``, ``fxquant int8_all int eager``: the full-integer presets
  (integer LayerNorm on PTF codes, Log-Int-Softmax + attn@V by shifts; ``int8_all`` also
  quantizes the residual stream and GELU), ``backend="int"`` with the default ``int_kernels``.
* ``torchao PT2E + torch.compile``: torch.export -> prepare_pt2e(X86InductorQuantizer default
  static config) -> the same 32 images -> convert_pt2e -> ``torch.compile`` (inductor
  freezing on, as torchao's X86 recipe asks; it applies to every compiled variant).
* ``ORT static int8``: ONNX Runtime QDQ int8 of the exported graph, MatMul and Gemm ops
  (Linears and attention matmuls), per-channel weights, MinMax (bench/peers.py).

Timing: every variant is warmed up (the first call's seconds are reported for the compiled
ones), then ``--rounds`` rounds; in each round every variant runs one forward per batch
size, the order rotated each round so that no variant always follows the same neighbour.
Medians and spreads (min-max) of the per-round times. Also: fxquant's compile time (trace +
passes + calibration on the 32 images, with the per-pass diff and the integer graph's
equivalence check) relative to one FP32 forward of those 32 images; weight bytes of the
integer graph against FP32; each variant's output QSNR against FP32 on the timed batch.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import timm
import torch
from torch import nn

import fxquant
from bench.markdown import publish
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.runtime.int_modules import IntLinear
from fxquant.runtime.onednn import onednn_available

MODELS = ("vit_base_patch16_224", "deit_small_patch16_224")
BATCHES = (1, 8)
THREADS = 2
CALIB_IMAGES, CALIB_BATCH = 32, 8
FP32, INT_EAGER, INT_COMPILED, PT2E, ORT = (
    "fp32 eager",
    "fxquant int, portable kernels, eager",
    "fxquant int, portable kernels + torch.compile",
    "torchao PT2E + torch.compile",
    "ORT static int8",
)
# the default compile(..., backend="int"): int_kernels="auto", oneDNN's kernels on an x86 CPU that has them
ONEDNN_EAGER = "fxquant int, default kernels (auto: oneDNN), eager"
ONEDNN_COMPILED = "fxquant int, default kernels (auto: oneDNN) + torch.compile"
# the full-integer presets (integer LayerNorm, Log-Int-Softmax; int8_all: residual and GELU points), default kernels
FULL_INTEGER = {"fqvit_w8a8": "fxquant fqvit_w8a8 int eager", "int8_all": "fxquant int8_all int eager"}


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@dataclass
class Variant:
    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    first_call_s: dict[int, float] = field(default_factory=dict)
    times: dict[int, list[float]] = field(default_factory=dict)
    qsnr_db: dict[int, float] = field(default_factory=dict)
    error: Optional[str] = None


# ------------------------------------------------------------------------- builders
def build_pt2e_compiled(model: nn.Module, calib: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchao PT2E with X86InductorQuantizer, then torch.compile (batch dimension dynamic
    in the export where the model allows it; inductor specialises per batch size)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    m = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
        exported = torch.export.export(m, (calib[:2],), dynamic_shapes=dims).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in torch.split(calib, CALIB_BATCH):
                prepared(batch)
        converted = convert_pt2e(prepared)
    return torch.compile(converted)


def build_ort(model: nn.Module, calib: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    from bench.peers import build_ort_matmul_gemm

    return build_ort_matmul_gemm(model, calib)


def weight_bytes(fp32: nn.Module, qm: torch.fx.GraphModule) -> dict[str, int]:
    """Bytes of the integer Linears (everything they hold at run time: int8 weight plus the
    per-feature output constants) against the same Linears in FP32 (weight and bias), and
    of every tensor each whole model holds (state_dict)."""
    int_linears = [m for m in qm.modules() if isinstance(m, IntLinear)]
    fp32_linear = sum(4 * (m.in_features + 1) * m.out_features for m in int_linears)
    int_linear = sum(t.numel() * t.element_size() for m in int_linears for t in m.state_dict().values())

    def total(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    return {
        "fp32_linear": fp32_linear,
        "int_linear": int_linear,
        "fp32_total": total(fp32),
        "int_total": total(qm),
        "int_linears": len(int_linears),
    }


def cpu_model() -> str:
    """The CPU's model name (int8 GEMM speed differs a lot between CPU families), else the machine."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- timing
@torch.no_grad()
def timed(run: Callable, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run(x)
    return time.perf_counter() - start, out


def measure_model(name: str, batches, rounds: int, skip_peers: bool, log) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    calib = images(CALIB_IMAGES, seed=1)
    inputs = {b: images(b, seed=100 + b) for b in batches}

    with torch.no_grad():
        fp32_32 = min(timed(model, calib)[0] for _ in range(2))
    qm = fxquant.compile(
        model,
        "w8a8",
        calib_data=list(torch.split(calib, CALIB_BATCH)),
        backend="int",
        int_kernels="portable",
        progress=False,
        model_name=name,
    )

    variants = [Variant(FP32, model), Variant(INT_EAGER, qm), Variant(INT_COMPILED, torch.compile(qm))]
    start = time.perf_counter()  # the default compile: auto kernels, per-pass diff, equivalence check
    qm_onednn = fxquant.compile(
        model, "w8a8", calib_data=list(torch.split(calib, CALIB_BATCH)), backend="int", progress=False, model_name=name
    )
    compile_s = time.perf_counter() - start
    log(f"{name}: fxquant compile {compile_s:.1f} s, FP32 forward of {CALIB_IMAGES} images {fp32_32:.2f} s")
    if onednn_available():
        variants += [Variant(ONEDNN_EAGER, qm_onednn), Variant(ONEDNN_COMPILED, torch.compile(qm_onednn))]
    else:
        variants.append(Variant(ONEDNN_EAGER, None, error="oneDNN int8 ops not available on this machine"))
    full_notes = []
    for preset, label in FULL_INTEGER.items():
        start = time.perf_counter()
        try:
            qm_full = fxquant.compile(
                model, preset, calib_data=list(torch.split(calib, CALIB_BATCH)), backend="int", progress=False
            )
        except Exception as exc:  # noqa: BLE001 - a preset that cannot compile is reported, not fatal
            variants.append(Variant(label, None, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        log(f"{name}: fxquant compile {preset} {time.perf_counter() - start:.1f} s")
        variants.append(Variant(label, qm_full))
        full_notes += [
            f"{preset}: {n}" for n in qm_full.report.notes if n.startswith(("integer vs fake-quant", "output QSNR"))
        ]
    if not skip_peers:
        for label, build in ((PT2E, build_pt2e_compiled), (ORT, build_ort)):
            try:
                variants.append(Variant(label, build(model, calib)))
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                variants.append(Variant(label, None, error=f"{type(exc).__name__}: {exc}"[:200]))
    with torch.no_grad():
        references = {b: model(x) for b, x in inputs.items()}
    for v in variants:
        if v.error:
            log(f"  {v.name}: unavailable ({v.error})")
            continue
        for b, x in inputs.items():
            try:
                first, out = timed(v.run, x)
                timed(v.run, x)
            except Exception as exc:  # noqa: BLE001
                v.error = f"{type(exc).__name__}: {exc}"[:200]
                log(f"  {v.name}: failed at batch {b} ({v.error})")
                break
            v.first_call_s[b] = first
            v.qsnr_db[b] = output_qsnr(references[b], out)
            log(f"  {v.name} batch {b}: first call {first:.1f} s, QSNR vs FP32 {v.qsnr_db[b]:.2f} dB")
    ready = [v for v in variants if not v.error]
    for r in range(rounds):
        order = ready[r % len(ready) :] + ready[: r % len(ready)]
        for b, x in inputs.items():
            for v in order:
                v.times.setdefault(b, []).append(timed(v.run, x)[0])
        log(f"  round {r + 1}/{rounds} done")
    return {
        "name": name,
        "variants": variants,
        "compile_s": compile_s,
        "fp32_32_s": fp32_32,
        "bytes": weight_bytes(model, qm),
        "notes": [
            n for n in qm.report.notes if n.startswith(("integer vs fake-quant", "output QSNR", "lower_integer:"))
        ]
        + [
            f"default kernels: {n}"
            for n in qm_onednn.report.notes
            if n.startswith(
                ("int_kernels=", "use_onednn_kernels", "fuse_residual_adds", "integer vs fake-quant", "output QSNR")
            )
        ]
        + full_notes,
    }


# --------------------------------------------------------------------------- output
def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def table(result: dict, batches) -> list[str]:
    lines = [
        "| batch | variant | median ms | spread ms (min-max) | x FP32 eager | first call s | QSNR vs FP32 dB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_name = {v.name: v for v in result["variants"]}
    for b in batches:
        fp32 = statistics.median(by_name[FP32].times[b])
        for v in result["variants"]:
            if v.error or b not in v.times:
                lines.append(f"| {b} | {v.name} | - | - | - | - | unavailable: {v.error} |")
                continue
            med = statistics.median(v.times[b])
            lines.append(
                f"| {b} | {v.name} | {_ms(med)} | {_ms(min(v.times[b]))}-{_ms(max(v.times[b]))} | "
                f"{fp32 / med:.2f} | {v.first_call_s[b]:.1f} | {v.qsnr_db[b]:.2f} |"
            )
    return lines


def _target(value: float, target: Optional[float], vit_b: bool) -> str:
    if target is None:
        return ""
    if not vit_b:
        return f" (the {target}x target is set for ViT-B/16)"
    return f" (target >= {target}x: {'met' if value >= target else 'not met'})"


def acceptance(result: dict) -> list[str]:
    by_name = {v.name: v for v in result["variants"]}
    lines = []
    if 8 in by_name[FP32].times:
        median = {n: statistics.median(v.times[8]) for n, v in by_name.items() if not v.error and 8 in v.times}
        vit_b = result["name"].startswith("vit_base")
        # (eager, compiled, eager target x FP32, compiled target x PT2E): issue 18's targets for ViT-B/16
        rows = [(INT_EAGER, INT_COMPILED, None, None), (ONEDNN_EAGER, ONEDNN_COMPILED, 3.5, 1.15)]
        rows += [(label, None, 2.5, None) for label in FULL_INTEGER.values()]
        for eager, compiled, eager_target, compiled_target in rows:
            if eager not in median:
                continue
            speedup = median[FP32] / median[eager]
            lines.append(f"- batch 8: {eager} {speedup:.2f}x FP32 eager{_target(speedup, eager_target, vit_b)}")
            if compiled in median and PT2E in median:
                ratio = median[PT2E] / median[compiled]
                lines.append(
                    f"- batch 8: {compiled} {ratio:.2f}x the speed of PT2E + torch.compile, "
                    f"{median[FP32] / median[compiled]:.2f}x FP32 eager{_target(ratio, compiled_target, vit_b)}"
                )
    nbytes = result["bytes"]
    share = nbytes["int_linear"] / nbytes["fp32_linear"]
    lines.append(
        f"- weight bytes of the {nbytes['int_linears']} integer Linears: {nbytes['int_linear'] / 2**20:.1f} "
        f"MiB vs {nbytes['fp32_linear'] / 2**20:.1f} MiB FP32 = {100 * share:.1f}% (target <= 26%: "
        f"{'met' if share <= 0.26 else 'not met'}); whole model {nbytes['int_total'] / 2**20:.1f} MiB vs "
        f"{nbytes['fp32_total'] / 2**20:.1f} MiB"
    )
    ratio = result["compile_s"] / result["fp32_32_s"]
    lines.append(
        f"- fxquant compile, defaults (trace, passes, {CALIB_IMAGES}-image calibration, per-pass diff, "
        f"equivalence check) {result['compile_s']:.1f} s = {ratio:.1f}x one FP32 forward of the {CALIB_IMAGES} "
        f"images ({result['fp32_32_s']:.2f} s) (target <= 2.5x: {'met' if ratio <= 2.5 else 'not met'})"
    )
    lines += [f"- {note}" for note in result["notes"]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--skip-peers", action="store_true", help="no PT2E / ONNX Runtime (quick looks)")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"intra-op threads (default {THREADS}; 1 gives steadier quick looks on a busy machine)",
    )
    parser.add_argument("--write", action="store_true", help="write the Speed section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # torchao's X86 recipe; constant-folds weights of every compiled variant

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    body = [
        "## Speed (integer backend, CPU)",
        "",
        f"`python -m bench.speed {' '.join(argv if argv is not None else sys.argv[1:])}` (models {', '.join(args.models)}; batches "
        f"{', '.join(map(str, args.batches))}; {args.rounds} interleaved rounds; {args.threads} threads; "
        f"torch {torch.__version__}; {cpu_model()}). Random-init weights: "
        "speed does not depend on them; QSNR against FP32 on randn inputs.",
        "",
    ]
    for name in args.models:
        result = measure_model(name, args.batches, args.rounds, args.skip_peers, log)
        body += [f"### {name}", ""] + table(result, args.batches) + [""] + acceptance(result) + [""]
    publish("speed", "\n".join(body), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
