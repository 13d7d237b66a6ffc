"""End-to-end output QSNR of ``compile`` on the timm ViT family (random init).

Each model: torch.manual_seed(0) random init, 32 seeded randn calibration images (batches of
8), diff input seed 123; the figure is the report's output QSNR after the last pass.

    python -m bench.models_e2e [--qconfig w8a8] [--models NAME ...] [--write]
    python -m bench.models_e2e --all-presets [--write]   # every preset x every model, a matrix

``--all-presets`` compiles without the per-pass diff (faster) and measures the output QSNR
against the FP32 model on the diff input directly; a preset that fails on a model is a
cell with its error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import timm
import torch

import fxquant
from bench.markdown import replace_section

MODELS = {
    "vit_tiny_patch16_224": {},
    "vit_base_patch16_224": {},
    "deit_small_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},
    "swin_tiny_patch4_window7_224": {},
    "vit_small_patch14_dinov2": {"img_size": 224, "num_classes": 0},
}


def run_one(name: str, qconfig: str, calib_count: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, **MODELS.get(name, {})).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    img = getattr(getattr(model, "patch_embed", None), "img_size", None) or size
    torch.manual_seed(0)
    calib = torch.randn(calib_count, 3, *img)
    torch.manual_seed(123)
    diff = torch.randn(1, 3, *img)
    start = time.perf_counter()
    qm = fxquant.compile(model, qconfig, calib_data=calib, diff_inputs=diff, model_name=name, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = qm(diff)
    points = qm.report.quant_points()
    return {
        "model": name,
        "nodes": len(qm.graph.nodes),
        "points": len(points),
        "output_db": qm.report.final.output_qsnr_db,
        "finite": bool(torch.isfinite(out).all()),
        "worst": min(points, key=lambda n: n["qsnr_db"]) if points else None,
        "seconds": seconds,
    }


def run_matrix(models: list[str], calib_count: int) -> list[str]:
    from fxquant.quant.quantizers import qsnr_db

    presets = fxquant.preset_names()
    lines = ["| model | " + " | ".join(f"`{p}`" for p in presets) + " |", "|---|" + "---:|" * len(presets)]
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, **MODELS.get(name, {})).eval()
        img = getattr(getattr(model, "patch_embed", None), "img_size", None) or (224, 224)
        torch.manual_seed(0)
        calib = torch.randn(calib_count, 3, *img)
        torch.manual_seed(123)
        diff = torch.randn(1, 3, *img)
        with torch.no_grad():
            ref = model(diff)
        cells = []
        for preset in presets:
            try:
                qm = fxquant.compile(
                    model, preset, calib_data=calib, diff_inputs=diff, progress=False, numeric_diff=False
                )
                with torch.no_grad():
                    cells.append(f"{qsnr_db(ref, qm(diff)):.2f}")
            except Exception as exc:  # noqa: BLE001 - a failure is a cell, not a crash
                cells.append(f"FAILED: {type(exc).__name__}: {str(exc)[:120]}")
            print(f"{name} {preset}: {cells[-1]}", flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qconfig", default="w8a8")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--all-presets", action="store_true", help="every preset x every model (output QSNR)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.all_presets:
        lines = run_matrix(args.models, args.calib)
        print("\n".join(lines))
        if args.write:
            body = (
                f"## Every preset on the ViT family (random init)\n\nCommand: `python -m bench.models_e2e "
                f"--all-presets --write` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, timm "
                f"{timm.__version__}). Output QSNR dB against the FP32 model on one seeded randn image; "
                f"{args.calib} seeded randn calibration images. Random weights have no trained outliers: "
                "these figures show that every preset compiles and runs every model, not real accuracy "
                "(the DINOv2 and accuracy sections have real weights).\n\n" + "\n".join(lines)
            )
            replace_section("models_e2e_all_presets", body)
        return 0
    lines = [
        "| model | fx nodes | quant points | output QSNR dB | finite | worst point (dB) | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        r = run_one(name, args.qconfig, args.calib)
        worst = f"{r['worst']['group']} {r['worst']['module']} ({r['worst']['qsnr_db']:.1f})" if r["worst"] else "-"
        lines.append(
            f"| {name} | {r['nodes']} | {r['points']} | {r['output_db']:.2f} | {r['finite']} | {worst} | {r['seconds']:.1f} |"
        )
        print(lines[-1], flush=True)
        if not r["finite"] or not math.isfinite(r["output_db"]):
            print(f"{name}: non-finite output", file=sys.stderr)
    if args.write:
        body = (
            f"## compile on the ViT family ({args.qconfig}, random init)\n\nCommand: `python -m bench.models_e2e "
            f"--qconfig {args.qconfig} --write` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
            f"timm {timm.__version__}). {args.calib} seeded randn calibration images, diff input seed 123.\n\n"
            + "\n".join(lines)
        )
        replace_section(f"models_e2e_{args.qconfig}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
