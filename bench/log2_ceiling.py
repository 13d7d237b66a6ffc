"""How much of DINOv2's feature QSNR log2 attention probabilities can keep (issue 4's 26 dB bar).

    python -m bench.log2_ceiling            # print only
    python -m bench.log2_ceiling --write    # also write the section into BENCHMARKS.md

Model and data as in :mod:`bench.dinov2_features` (real DINOv2 ViT-S/14 weights, the 20
foolbox photos, 0-9 calibrate, 10-19 evaluate, feature QSNR of the final-norm cls token
against FP32). Rows:

* ``w8a8`` (probabilities in float) and ``w8a8`` + fxquant's 8-bit Log-Int-Softmax
  (``intSoft: log2``: integer exp of the score codes, log2 codes, rows renormalized);
* the same graph with every Log-Int-Softmax swapped for an *ideal* one: float64 softmax of
  the same quantized scores, then the probability rounded to the nearest value of the form
  ``2**(-m / 2**f)`` (``f`` fractional exponent bits; ``f = 0`` is log2; rounding in the
  log or the linear domain), rows renormalized. This isolates what the log2 grid itself
  costs from what the integer exp costs;
* the ideal log2 probabilities with *no other* point quantized except one group of w8a8
  (scores kept on a 16-bit grid so that the softmax still reads quantized scores): what a
  single w8a8 point adds to the log2 error.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import warnings
from importlib import resources

import torch
import yaml

N_CALIB = 10
LOG2 = {"bits": 8, "signed": False, "quantization_method": "log2"}
SCORES16 = {"bits": 16, "signed": False, "calibration_mode": "head_wise", "observer_type": "MinmaxObserver"}
SINGLE_GROUPS = ("attn_v_out", "mlp_gelu", "norm1", "norm2", "attn_v_input", "attn_q_out")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ideal_log2(frac_bits: int, domain: str):
    """A LogIntSoftmax forward: float64 softmax, then nearest ``2**(-m / 2**frac_bits)``."""
    steps = 2**frac_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x.double(), self.dim)
        e = -torch.log2(p.clamp_min(1e-300)) * steps
        if domain == "log":
            m = torch.round(e)
        else:  # the nearer of the two neighbouring grid values, in the probability itself
            lo = torch.floor(e)
            m = torch.where(torch.pow(2.0, -lo / steps) - p <= p - torch.pow(2.0, -(lo + 1) / steps), lo, lo + 1)
        qmax = 2**self.bits - 1
        m = m.clamp(0, qmax)
        v = torch.where(m >= qmax, torch.zeros_like(p), torch.pow(2.0, -m / steps))
        return (v / v.sum(self.dim, keepdim=True)).to(x.dtype)

    return forward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import fxquant
    from bench.markdown import publish
    from bench.real_data import foolbox_imagenet
    from bench.real_models import load_dinov2_vits14
    from fxquant.quant.quantizers import qsnr_db
    from fxquant.runtime.log_int_softmax import LogIntSoftmax

    started = time.time()
    log("loading DINOv2 ViT-S/14 and the 20 foolbox photos")
    model = load_dinov2_vits14().eval()
    images, _, _ = foolbox_imagenet()
    calib, eval_x = images[:N_CALIB].contiguous(), images[N_CALIB:].contiguous()
    with torch.no_grad():
        ref = model(eval_x).float()
    w8a8 = yaml.safe_load((resources.files("fxquant.qconfigs") / "w8a8.yaml").read_text())

    def config(only=None, **groups) -> dict:
        cfg = copy.deepcopy(w8a8)
        cfg.update(groups)
        if only is not None:
            cfg = {k: g for k, g in cfg.items() if not isinstance(g, dict) or k in only}
        cfg["name"] = "w8a8_log2_study"
        return cfg

    def feature_db(cfg: dict, forward=None) -> float:
        qm = fxquant.compile(model, cfg, calib_data=calib, progress=False, numeric_diff=False)
        if forward is not None:
            swapped = 0
            for module in qm.modules():
                if isinstance(module, LogIntSoftmax):
                    module.forward = forward.__get__(module)
                    swapped += 1
            if not swapped:
                raise RuntimeError("no LogIntSoftmax in the graph: the softmax did not read quantized scores")
        with torch.no_grad():
            return qsnr_db(ref, qm(eval_x).float())

    rows = []

    def row(label: str, value: float) -> None:
        log(f"{label}: {value:.2f} dB")
        rows.append((label, value))

    row("`w8a8` (probabilities in float)", feature_db(config()))
    row("`w8a8` + 8-bit Log-Int-Softmax (fxquant, integer exp)", feature_db(config(intSoft=LOG2)))
    for frac, domain in ((0, "log"), (0, "linear"), (1, "linear"), (2, "linear")):
        base = "log2" if frac == 0 else f"log2 with {frac} fractional exponent bit{'s' if frac > 1 else ''}"
        row(
            f"`w8a8` + ideal {base} probabilities ({domain}-domain rounding)",
            feature_db(config(intSoft=LOG2), ideal_log2(frac, domain)),
        )
    alone = config(only={"intSoft", "attn_kv_out"}, intSoft=LOG2, attn_kv_out=SCORES16)
    row(
        "ideal log2 probabilities alone (16-bit scores, nothing else quantized)",
        feature_db(alone, ideal_log2(0, "log")),
    )
    for group in SINGLE_GROUPS:
        cfg = config(only={"intSoft", "attn_kv_out", group}, intSoft=LOG2, attn_kv_out=SCORES16)
        row(f"ideal log2 probabilities + `w8a8`'s `{group}` only", feature_db(cfg, ideal_log2(0, "log")))

    command = "python -m bench.log2_ceiling" + (" " + shlex.join(argv) if argv else " " + shlex.join(sys.argv[1:]))
    lines = [
        "## Log2 attention probabilities on DINOv2: what the grid costs",
        "",
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
        f"{torch.__version__}, 1 thread, {time.time() - started:.0f} s). DINOv2 ViT-S/14 (real weights), foolbox "
        "photos 0-9 calibrate, 10-19 evaluate; feature QSNR against FP32. *Ideal* = float64 softmax of the "
        "same quantized scores, each probability rounded to the nearest 2^(-m/2^f), rows renormalized "
        "(see the module docstring).",
        "",
        "| configuration | feature QSNR dB |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {value:.2f} |" for label, value in rows]
    values = dict(rows)
    lis_db = values["`w8a8` + 8-bit Log-Int-Softmax (fxquant, integer exp)"]
    ideal_db = values["`w8a8` + ideal log2 probabilities (log-domain rounding)"]
    lines += [
        "",
        f"- Issue 4's bar, `w8a8` with log2 attention probabilities >= 26 dB: **not met** "
        f"({lis_db:.2f} dB). The log2 grid itself is what costs: ideal float log2 gives {ideal_db:.2f}"
        " dB, so fxquant's integer exp loses only the difference. Log2 probabilities with nothing else "
        "quantized stay near 26-27 dB, and adding w8a8's attn_v_out or mlp_gelu point alone already takes "
        "them below 26 dB; `w8a8` without any probability quantizer is itself below 26 dB.",
    ]
    publish("log2_ceiling", "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
