"""What each accuracy-recovery pass buys on the real DINOv2 ViT-S/14: feature QSNR per preset
with each pass on and off.

    python -m bench.recovery_ablation [--presets w8a8,w6a6] [--write]

Model, photos and metric as bench.dinov2_features (foolbox photos 0-9 calibrate, 10-19
evaluate; QSNR of the final-norm cls features against FP32), fake backend, one torch
thread. Each preset runs as a row per variant, the variant's keys written over the preset
(so the same row means the same passes whatever the preset ships with):

- ``none``: round-to-nearest weights, SmoothQuant 0.5 (what the presets shipped before the
  recovery passes);
- ``+ bias_correction``, ``+ gptq``: one pass added to ``none``;
- ``rotate``: residual stream and heads rotated, no SmoothQuant (rotated activations have no
  outlier channels left to smooth); ``rotate + fc2``: also the online Hadamard before fc2;
- ``rotate + gptq``, ``rotate + gptq + bias_correction``, ``rotate + fc2 + gptq + bias_correction``.

The ``shipped`` column marks the variant the preset file now uses; the compile time and the
recovery passes' own times are per row.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fxquant
from bench.dinov2_features import feature_qsnr_db
from bench.markdown import publish
from bench.real_data import foolbox_imagenet
from bench.real_models import load_dinov2_vits14

OFF = {"rotate": False, "gptq": False, "bias_correction": False, "smooth_alpha": 0.5}
ROTATE = {**OFF, "rotate": True, "smooth_alpha": None}
VARIANTS = [
    ("none", OFF),
    ("+ bias_correction", {**OFF, "bias_correction": True}),
    ("+ gptq", {**OFF, "gptq": True}),
    ("rotate", ROTATE),
    ("rotate + fc2", {**ROTATE, "rotate": {"fc2": True}}),
    ("rotate + bias_correction", {**ROTATE, "bias_correction": True}),
    ("rotate + gptq", {**ROTATE, "gptq": True}),
    ("rotate + gptq + bias_correction", {**ROTATE, "gptq": True, "bias_correction": True}),
    (
        "rotate + fc2 + gptq + bias_correction",
        {**ROTATE, "rotate": {"fc2": True}, "gptq": True, "bias_correction": True},
    ),
]
PRESETS = ("w8a8", "w6a6", "w4a8", "int8_all", "w4a4")
RECOVERY_PASSES = ("rotate", "gptq", "bias_correction")


def shipped_variant(preset: str) -> str:
    """The variant whose recovery keys equal the preset file's."""
    config = fxquant.load_qconfig(preset)
    for label, keys in VARIANTS:
        probe = fxquant.load_qconfig({**config.to_dict(), **keys})
        if probe.recovery == config.recovery and probe.smooth_alpha == config.smooth_alpha:
            return label
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--variants", default="", help="comma-separated variant labels (default: all)")
    parser.add_argument("--section", default="recovery_ablation", help="BENCHMARKS.md section to write")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_dinov2_vits14().eval()
    images, _, _ = foolbox_imagenet()
    calib, evaluation = images[:10], images[10:]
    with torch.no_grad():
        reference = model(evaluation)
    lines = [
        "## Accuracy recovery passes on DINOv2 ViT-S/14 (feature QSNR, CPU)",
        "",
        f"Command: `python -m bench.recovery_ablation {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        "1 thread, other jobs sharing the 2 cores: times are indicative). Protocol of the DINOv2 features section: "
        "photos 0-9 calibrate, photos 10-19 evaluate, fake backend. Variants are written over each preset "
        "(see the module docstring); `none` is round-to-nearest with SmoothQuant 0.5, the presets before the "
        "recovery passes. The quantized graph's own noise on these 10 photos is about ±0.35 dB at w8a8 "
        "(keep_float section).",
        "",
        "| preset | variant | shipped | feature QSNR dB | compile s | rotate / gptq / bias_correction s |",
        "|---|---|:-:|---:|---:|---|",
    ]
    for preset in args.presets.split(","):
        shipped = shipped_variant(preset)
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        for label, keys in VARIANTS:
            if chosen and label not in chosen:
                continue
            config = {**fxquant.load_qconfig(preset).to_dict(), **keys}
            start = time.perf_counter()
            qm = fxquant.compile(model, config, calib_data=calib, diff_inputs=evaluation[:1], progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                db = feature_qsnr_db(reference, qm(evaluation))
            times = {p.name: p.seconds for p in qm.report.passes}
            per_pass = " / ".join(f"{times[n]:.1f}" if n in times else "-" for n in RECOVERY_PASSES)
            mark = "yes" if label == shipped else ""
            lines.append(f"| `{preset}` | {label} | {mark} | {db:.2f} | {seconds:.1f} | {per_pass} |")
            print(lines[-1], flush=True)
    publish(args.section, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
