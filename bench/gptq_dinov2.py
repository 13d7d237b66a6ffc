"""What the gptq pass buys on the real DINOv2 ViT-S/14: feature QSNR with and without it.

    python -m bench.gptq_dinov2 [--write]

Same model, photos and metric as bench.dinov2_features (foolbox photos 0-9 calibrate,
10-19 evaluate; feature QSNR of the final-norm cls features against FP32), fake backend,
one torch thread. Each preset with round-to-nearest weights (as it ships) and with
``gptq: true`` (per-channel scales) or ``gptq: {group_size: 64}``; the compile time and the
gptq pass's own time per row.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxquant
from bench.dinov2_features import feature_qsnr_db
from bench.markdown import publish
from bench.real_data import foolbox_imagenet
from bench.real_models import load_dinov2_vits14

ROWS = [
    ("w4a8", "w4a8"),
    ("w4a8 + gptq", {"extends": "w4a8", "gptq": True}),
    ("w4a8 + gptq, group size 64", {"extends": "w4a8", "gptq": {"group_size": 64}}),
    ("w6a6", "w6a6"),
    ("w6a6 + gptq", {"extends": "w6a6", "gptq": True}),
    ("w8a8", "w8a8"),
    ("w8a8 + gptq", {"extends": "w8a8", "gptq": True}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_dinov2_vits14().eval()
    images, _, _ = foolbox_imagenet()
    calib, evaluation = images[:10], images[10:]
    with torch.no_grad():
        reference = model(evaluation)
    lines = [
        "## gptq on DINOv2 ViT-S/14 (feature QSNR, CPU)",
        "",
        f"Command: `python -m bench.gptq_dinov2 --write` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        "1 thread). Protocol of the DINOv2 features section: photos 0-9 calibrate, photos 10-19 evaluate, "
        "fake backend.",
        "",
        "| qconfig | feature QSNR dB | compile s | of which gptq s |",
        "|---|---:|---:|---:|",
    ]
    for label, qconfig in ROWS:
        start = time.perf_counter()
        qm = fxquant.compile(model, qconfig, calib_data=calib, diff_inputs=evaluation[:1], progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            db = feature_qsnr_db(reference, qm(evaluation))
        gptq_s = sum(p.seconds for p in qm.report.passes if p.name == "gptq")
        lines.append(f"| {label} | {db:.2f} | {seconds:.1f} | {gptq_s:.1f} |")
        print(lines[-1], flush=True)
    publish("gptq_dinov2", "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
