"""Where fxquant's compile time goes, against one FP32 forward of the calibration images (issue 18).

    python -m bench.compile_time                      # ViT-B/16 and DeiT-S, w8a8, backend="int"
    python -m bench.compile_time --models deit_small_patch16_224 --modes off,final,all

Per model (timm, random init after torch.manual_seed(0)), with ``--threads`` (2) intra-op
threads: one FP32 forward of the 32 seeded randn calibration images in batches of 8 (the
best of two, one before and one after the compiles), then ``fxquant.compile(model, "w8a8",
backend="int", calib_data=images)`` once per numeric-diff mode (``off``: numeric_diff=False,
``final``: "final", ``all``: True, the default; ``dump``: True with a dump dir). For each:
the wall time, its ratio to the FP32 forward, each pass's own seconds (``record.seconds``),
the numeric diff's and the dumps' seconds (``record.diff_seconds``, ``record.dump_seconds``)
and the rest (tracing, the reference copy, the integer equivalence check): wall minus those.
Other processes on the machine slow everything down; the load average is printed with
every row, and only ratios measured in the same run compare. On a shared machine
``--clock cpu --threads 1`` measures the process's CPU time instead of wall time (every
timer, the report's included, reads ``time.process_time``): the work done, much less
sensitive to the other processes than wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import timm
import torch

import fxquant

MODELS = ("vit_base_patch16_224", "deit_small_patch16_224")
MODES = {"off": False, "final": "final", "all": True, "dump": True}
CALIB_IMAGES, CALIB_BATCH = 32, 8


def fp32_forward_seconds(model: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        model(images[:CALIB_BATCH])  # warm-up
        start = time.perf_counter()
        for batch in images.split(CALIB_BATCH):
            model(batch)
    return time.perf_counter() - start


def compile_row(model: torch.nn.Module, images: torch.Tensor, mode: str, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dump_dir = tmp if mode == "dump" else None
        start = time.perf_counter()
        qm = fxquant.compile(
            model,
            "w8a8",
            calib_data=images,
            backend=backend,
            numeric_diff=MODES[mode],
            dump_dir=dump_dir,
            progress=False,
        )
        wall = time.perf_counter() - start
    records = qm.report.passes
    passes = {r.name: r.seconds for r in records[1:]}
    diff = sum(getattr(r, "diff_seconds", 0.0) for r in records)
    dump = sum(getattr(r, "dump_seconds", 0.0) for r in records)
    return {
        "wall": wall,
        "passes": passes,
        "diff": diff,
        "dump": dump,
        "rest": wall - sum(passes.values()) - diff - dump,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="off,final,all")
    parser.add_argument("--backend", default="int")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    if args.clock == "cpu":  # every perf_counter reader (the report's Timing too) now reads CPU time
        time.perf_counter = time.process_time
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(CALIB_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        before = fp32_forward_seconds(model, images)
        rows = {mode: compile_row(model, images, mode, args.backend) for mode in modes}
        fp32 = min(before, fp32_forward_seconds(model, images))
        print(
            f"\n{name}: FP32 forward of {CALIB_IMAGES} images {fp32:.2f} s (best of 2; {args.clock} time, "
            f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f})"
        )
        print(f"{'':24}" + "".join(f"{mode:>16}" for mode in modes))
        names = list(rows[modes[0]]["passes"])
        lines = [(p, [rows[m]["passes"].get(p, 0.0) for m in modes]) for p in names]
        lines += [(key, [rows[m][key] for m in modes]) for key in ("diff", "dump", "rest", "wall")]
        for label, values in lines:
            print(f"{label:24}" + "".join(f"{v:8.2f}s {v / fp32:5.2f}x" for v in values))


if __name__ == "__main__":
    main()
