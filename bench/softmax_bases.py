"""The attention probabilities' log quantizer on the real DINOv2 ViT-S/14: log2 (FQ-ViT's
Log-Int-Softmax) vs log_sqrt2 (RepQ-ViT) vs the adaptive base (AdaLog-style), feature QSNR.

    python -m bench.softmax_bases [--presets int8_all,fqvit_w8a8,fqvit_w8a8_attn4]
                                  [--methods log2,log_sqrt2,log_adaptive] [--int fqvit_w8a8:log_sqrt2] [--write]

Model, photos and metric as bench.dinov2_features (foolbox photos 0-9 calibrate, 10-19
evaluate, or the other way round with ``--swap``; QSNR of the final-norm cls features against
FP32), one torch thread. Each row
is the preset with its ``intSoft`` point's ``quantization_method`` replaced (bits as the
preset has them: 8, or 4 for ``fqvit_w8a8_attn4``); ``float`` turns the point off (the
probabilities in float: the ceiling of any quantizer). The fake backend runs every row;
``--int preset:method`` adds integer-backend rows (portable kernels), whose QSNR against the
fake-quant graph of the same row is shown too. The bases ``log_adaptive`` chose are listed
per block (as the step s of the base 2**s).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch

import fxquant
from bench.dinov2_features import feature_qsnr_db
from bench.markdown import publish
from bench.real_data import foolbox_imagenet
from bench.real_models import load_dinov2_vits14
from fxquant.runtime.log_base_softmax import LogBaseSoftmax
from fxquant.runtime.log_int_softmax import LogIntSoftmax

PRESETS = ("int8_all", "fqvit_w8a8", "fqvit_w8a8_attn4")
METHODS = ("float", "log2", "log_sqrt2", "log_adaptive")


def softmax_config(preset: str, method: str) -> dict:
    config = fxquant.load_qconfig(preset).to_dict()
    if method == "float":
        return {**config, "intSoft": {**config["intSoft"], "enable": False}}
    return {**config, "intSoft": {**config["intSoft"], "quantization_method": method}}


def chosen_bases(qm) -> str:
    """The steps of the probability quantizers in ``qm`` (LogIntSoftmax is step 1), counted."""
    steps = []
    for module in qm.modules():
        if isinstance(module, LogBaseSoftmax):
            steps.append(str(module.step))
        elif isinstance(module, LogIntSoftmax):
            steps.append("1")
    return ", ".join(f"{s} x{n}" for s, n in sorted(Counter(steps).items())) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--int", default="", help="comma-separated preset:method rows also run on the int backend")
    parser.add_argument("--swap", action="store_true", help="calibrate on photos 10-19, evaluate on 0-9")
    parser.add_argument("--section", default="softmax_bases", help="BENCHMARKS.md section to write")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_dinov2_vits14().eval()
    images, _, _ = foolbox_imagenet()
    calib, evaluation = (images[10:], images[:10]) if args.swap else (images[:10], images[10:])
    photos = "photos 10-19 calibrate, 0-9 evaluate" if args.swap else "photos 0-9 calibrate, 10-19 evaluate"
    with torch.no_grad():
        reference = model(evaluation)
    lines = [
        "## Attention-probability quantizers on DINOv2 ViT-S/14, photos swapped (10-19 calibrate, 0-9 evaluate; CPU)"
        if args.swap
        else "## Attention-probability quantizers on DINOv2 ViT-S/14: log2 vs log_sqrt2 vs adaptive base (CPU)",
        "",
        f"Command: `python -m bench.softmax_bases {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, 1 thread, other jobs sharing the 2 cores: "
        f"times are indicative). DINOv2 ViT-S/14 (real weights), foolbox {photos}; "
        "feature QSNR against FP32. Each row is the preset with its `intSoft` point's `quantization_method` "
        "replaced; `float` turns that point off. Steps: the base is 2**step (log2: 1, log_sqrt2: 1/2), "
        "listed per attention block.",
        "",
        "| preset | probabilities | bits | backend | feature QSNR dB | int vs fake dB | steps chosen | compile s |",
        "|---|---|---:|---|---:|---:|---|---:|",
    ]
    int_rows = {tuple(item.split(":")) for item in args.int.split(",") if item}
    for preset in args.presets.split(","):
        bits = fxquant.load_qconfig(preset).to_dict()["intSoft"].get("bits", 8)
        for method in args.methods.split(","):
            config = softmax_config(preset, method)
            backends = ["fake"] + (["int"] if (preset, method) in int_rows else [])
            fake_out = None
            for backend in backends:
                start = time.perf_counter()
                qm = fxquant.compile(
                    model, config, calib_data=calib, diff_inputs=evaluation[:1], backend=backend, progress=False
                )
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    out = qm(evaluation)
                db = feature_qsnr_db(reference, out)
                versus = f"{feature_qsnr_db(fake_out, out):.2f}" if fake_out is not None else ""
                fake_out = out if backend == "fake" else fake_out
                steps = chosen_bases(qm) if backend == "fake" and method != "float" else ""
                shown_bits = "-" if method == "float" else str(bits)
                lines.append(
                    f"| `{preset}` | {method} | {shown_bits} | {backend} | {db:.2f} | {versus} | {steps} | {seconds:.0f} |"
                )
                print(lines[-1], flush=True)
    publish(args.section, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
