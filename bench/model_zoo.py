"""The timm vision-transformer zoo under ``w8a8``: one model per architecture, random init.

For every timm architecture (a module of ``timm.models``) whose models are vision
transformers, the sweep takes a small model of it from ``timm.list_models(module=...)``,
shrinks it where its constructor allows (fewer blocks, small images) and compiles it with
``fxquant.compile(model, "w8a8")``: 8 seeded randn calibration images, one seeded randn
diff image. Per model: whether it compiles (or the error it was refused with), the share
of its Linear/Conv weight elements that are quantized (``report.weight_coverage``), the
number of activation quantization points and the output QSNR against FP32. A timm model
whose random-init classifier is all zeros (its output would be constant) gets the head
timm's ``reset_classifier`` builds, and says so.

    python -m bench.model_zoo [--families NAME ...] [--write]

``--write`` puts the table into BENCHMARKS.md (section ``model-zoo``).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Optional

import timm
import torch

import fxquant
from bench.markdown import publish
from fxquant.runtime.fake_quant import FakeQuantize

QCONFIG = "w8a8"
PASS_SHARE, PASS_DB = 0.9, 20.0

# architecture (timm module) -> (model, constructor kwargs that shrink it, image size)
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "vision_transformer": ("vit_tiny_patch16_224", dict(depth=2, img_size=64), 64),
    "deit": ("deit3_small_patch16_224", dict(depth=2, img_size=64), 64),
    "beit": ("beit_base_patch16_224", dict(depth=2, img_size=64, embed_dim=192, num_heads=3), 64),
    "eva": ("eva02_tiny_patch14_224", dict(depth=2, img_size=56), 56),
    "cait": ("cait_xxs24_224", dict(depth=2, img_size=64), 64),
    "xcit": ("xcit_nano_12_p16_224", dict(depth=2, img_size=64), 64),
    "swin_transformer": (
        "swin_tiny_patch4_window7_224",
        dict(depths=(1, 1), num_heads=(3, 6), img_size=56, embed_dim=48),
        56,
    ),
    "swin_transformer_v2": (
        "swinv2_tiny_window8_256",
        dict(depths=(1, 1), num_heads=(3, 6), img_size=64, embed_dim=48),
        64,
    ),
    "swin_transformer_v2_cr": (
        "swinv2_cr_tiny_224",
        dict(depths=(1, 1), num_heads=(3, 6), img_size=(64, 64), embed_dim=48),
        64,
    ),
    "levit": ("levit_128s", dict(img_size=64), 64),
    "levit (conv variant)": ("levit_conv_128s", dict(img_size=64), 64),
    "efficientformer": ("efficientformer_l1", dict(depths=(1, 1, 1, 1)), 224),
    "efficientformer_v2": ("efficientformerv2_s0", dict(), 224),
    "pit": ("pit_ti_224", dict(img_size=64), 64),
    "tnt": ("tnt_s_patch16_224", dict(depth=2, img_size=64), 64),
    "twins": ("twins_svt_small", dict(depths=(1, 1, 1, 1), img_size=64), 64),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 64),
    "crossvit": ("crossvit_tiny_240", dict(), 240),
    "convit": ("convit_tiny", dict(depth=2, img_size=64), 64),
    "coat": ("coat_lite_tiny", dict(), 224),
    "vision_transformer_relpos": ("vit_relpos_small_patch16_224", dict(depth=2, img_size=64), 64),
    "vision_transformer_sam": (
        "samvit_base_patch16",
        dict(depth=2, img_size=64, embed_dim=192, num_heads=3, global_attn_indexes=(1,), window_size=2),
        64,
    ),
    "mvitv2": ("mvitv2_tiny", dict(img_size=64), 64),
    "nest": ("nest_tiny", dict(img_size=64), 64),
    "volo": ("volo_d1_224", dict(img_size=64), 64),
    "gcvit": ("gcvit_xxtiny", dict(img_size=64), 64),
    "davit": ("davit_tiny", dict(depths=(1, 1, 1, 1)), 224),
    "tiny_vit": ("tiny_vit_5m_224", dict(depths=(1, 1, 1, 1)), 224),
    "hiera": ("hiera_tiny_224", dict(img_size=64), 64),
    "vitamin": ("vitamin_small_224", dict(img_size=64, depth=2), 64),
    "naflexvit": ("naflexvit_base_patch16_gap", dict(depth=2, img_size=64), 64),
}


def build(family: str) -> tuple[torch.nn.Module, int, str, list[str]]:
    name, kwargs, size = FAMILIES[family]
    module = family.split(" ")[0]
    if name not in timm.list_models(module=module):
        raise KeyError(f"{name} is not a model of timm's {module} in timm {timm.__version__}")
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    notes = []
    with torch.no_grad():
        if not model(torch.randn(1, 3, size, size)).abs().max() > 0:  # a zero-initialised classifier
            torch.manual_seed(0)
            model.reset_classifier(model.num_classes)
            notes.append("random-init head is zero: reset_classifier")
    return model.eval(), size, name, notes


def run_one(family: str) -> dict:
    row: dict = {"family": family, "model": FAMILIES[family][0], "notes": []}
    start = time.perf_counter()
    try:
        model, size, row["model"], row["notes"] = build(family)
        torch.manual_seed(0)
        calib = torch.randn(8, 3, size, size)
        torch.manual_seed(123)
        diff = torch.randn(1, 3, size, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = fxquant.compile(
                model, QCONFIG, calib_data=calib, diff_inputs=diff, progress=False, model_name=row["model"]
            )
    except Exception as exc:  # a refusal is a result of the sweep: its type and message go into the table
        row.update(error=f"{type(exc).__name__}: {_first_line(exc)}", seconds=time.perf_counter() - start)
        return row
    coverage = qm.report.weight_coverage
    if qm.meta.get("fxq.specialized_input") is not None:  # Python branches on sizes: traced for this size
        row["notes"].append("traced with the input's sizes")
    row.update(
        seconds=time.perf_counter() - start,
        share=coverage["quantized"] / coverage["total"] if coverage["total"] else 1.0,
        floats=coverage["float_weights"],
        points=sum(isinstance(m, FakeQuantize) for m in qm.modules()),
        output_db=qm.report.final.output_qsnr_db,
        warned=bool(qm.report.warnings),
        warnings=[w.splitlines()[0].removeprefix("WARNING: ").split(":")[0] for w in qm.report.warnings],
    )
    return row


def _first_line(exc: Exception, limit: int = 220) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def passes(row: dict) -> bool:
    return "error" not in row and row["share"] >= PASS_SHARE and row["output_db"] > PASS_DB


def _db(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def table(rows: list[dict], command: str) -> str:
    ok = sum(passes(r) for r in rows)
    refused = sum("error" in r for r in rows)
    lines = [
        f"## timm vision-transformer zoo (`{QCONFIG}`, random init)",
        "",
        f"`{command}` (timm {timm.__version__}, torch {torch.__version__}). One model per timm",
        "architecture, shrunk where its constructor allows; 8 seeded randn calibration images, output",
        "QSNR on one seeded randn image against the FP32 model. *quantized* is the share of Linear/Conv",
        "weight elements that are quantized (`report.weight_coverage`); *points* the activation",
        "quantization points. A model passes with >= 90% quantized and output QSNR > 20 dB.",
        "",
        f"**{ok} of {len(rows)} pass; {refused} refused with the error shown; "
        f"{len(rows) - ok - refused} compile below the bar.**",
        "",
        "| architecture | model | compiles | quantized | points | output QSNR dB | what stayed float / why |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | `{r['model']}` | refused | - | - | - | {r['error'].replace('|', '/')} |")
            continue
        floats = sorted(r["floats"], key=lambda f: -f["elements"])
        why = "; ".join(f"`{f['module']}` ({f['elements']}): {f['reason']}" for f in floats[:2])
        if len(floats) > 2:
            why += f"; +{len(floats) - 2} more"
        why = "; ".join(x for x in [*r["notes"], *(f"warned: {w}" for w in r["warnings"]), why] if x)
        verdict = ("yes" if passes(r) else "yes, below the bar") + (" (warned)" if r["warned"] else "")
        lines.append(
            f"| {r['family']} | `{r['model']}` | {verdict} | {100 * r['share']:.1f}% | {r['points']} "
            f"| {_db(r['output_db'])} | {why or '-'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", choices=sorted(FAMILIES), help="default: all")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for family in args.families or FAMILIES:
        row = run_one(family)
        status = row.get("error") or f"{100 * row['share']:.1f}% quantized, {_db(row['output_db'])} dB"
        print(f"{family:<26} {row['model']:<32} {row['seconds']:6.1f}s  {status}", flush=True)
        rows.append(row)
    publish("model-zoo", table(rows, "python -m bench.model_zoo --write"), args.write)
    return 0 if all(passes(r) or "error" in r or r["warned"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
