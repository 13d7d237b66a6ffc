"""keep_float on DINOv2 ViT-S/14 (real weights): the K most sensitive points in float vs K random ones.

    python -m bench.sensitivity            # print only
    python -m bench.sensitivity --write    # also write the section into BENCHMARKS.md
    python -m bench.sensitivity --qconfig fqvit_w8a8 --write   # another preset, its own section

Model and data as in :mod:`bench.dinov2_features`: timm ``vit_small_patch14_dinov2`` with the
real DINOv2 weights, output = final-norm cls token (B, 384); the 20 foolbox ImageNet photos,
0-9 calibrate, 10-19 evaluate. Metric: feature QSNR (``fxquant.quant.quantizers.qsnr_db``) against
the FP32 model over the (10, 384) evaluation features.

The model is compiled once (``--qconfig``, default w8a8; ``keep_float=0``). Points are chosen
exactly as ``fxquant.compile(keep_float=K)`` chooses them, on the first calibration batch
(photos 0-7; never the evaluation photos): :func:`fxquant.debug.rank_by_output` ranks every
point, :func:`fxquant.debug.choose_float_points` picks greedily among the most sensitive; the
first K picks are left in float with :func:`fxquant.debug.keep_in_float` on a copy, K = 1, 2, 4. The
baseline leaves K points drawn uniformly at random (seeds 0, 1, 2) in float.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata as _md
import platform
import random
import shlex
import sys
import time
import warnings

import torch

N_CALIB = 10
KS = (0, 1, 2, 4)
SEEDS = (0, 1, 2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _version(dist: str) -> str:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return "not installed"


def _db(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qconfig", default="w8a8")
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench.sensitivity", *map(shlex.quote, given)])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()

    import fxquant
    from bench.real_data import foolbox_imagenet
    from bench.real_models import load_dinov2_vits14
    from fxquant.debug import choose_float_points, keep_in_float, quant_point_nodes, rank_by_output
    from fxquant.quant.calib_data import CALIB_BATCH
    from fxquant.quant.quantizers import qsnr_db

    log("loading DINOv2 ViT-S/14 and the 20 foolbox photos")
    model = load_dinov2_vits14()
    images, _, _ = foolbox_imagenet()
    calib, eval_x = images[:N_CALIB].contiguous(), images[N_CALIB:].contiguous()
    with torch.no_grad():
        ref = model(eval_x).float()

    def feature_db(qm) -> float:
        with torch.no_grad():
            return qsnr_db(ref, qm(eval_x).float())

    t0 = time.perf_counter()
    qm0 = fxquant.compile(
        model,
        args.qconfig,
        calib_data=calib,
        diff_inputs=eval_x[:1],
        progress=False,
        model_name="vit_small_patch14_dinov2",
    )
    compile_s = time.perf_counter() - t0
    names = [n.name for n in quant_point_nodes(qm0)]
    log(f"compiled in {compile_s:.1f} s; {len(names)} quantization points; K=0 QSNR {feature_db(qm0):.2f} dB")
    t0 = time.perf_counter()
    ranked = rank_by_output(qm0, (calib[:CALIB_BATCH],))
    rank_s = time.perf_counter() - t0
    log(
        f"ranked {len(ranked)} points on photos 0-{CALIB_BATCH - 1} in {rank_s:.1f} s; top 4: "
        + ", ".join(f"{r['node']} {r['output_qsnr_db_isolated']:.2f}" for r in ranked[:4])
    )

    t0 = time.perf_counter()
    chosen = choose_float_points(qm0, max(KS), (calib[:CALIB_BATCH],), ranked=ranked)
    choose_s = time.perf_counter() - t0
    log(
        f"greedy picks among the {max(2 * max(KS), max(KS) + 4)} most sensitive in {choose_s:.1f} s: "
        + ", ".join(f"{r['node']} -> {r['output_qsnr_db_kept']:.2f}" for r in chosen)
    )

    def kept(points) -> float:
        qm = copy.deepcopy(qm0)
        keep_in_float(qm, list(points), why="bench")
        return feature_db(qm)

    rows = []
    base = feature_db(qm0)
    for k in KS:
        sens = base if k == 0 else kept(r["node"] for r in chosen[:k])
        rand = [base if k == 0 else kept(random.Random(seed).sample(names, k)) for seed in SEEDS]
        rows.append(
            {
                "k": k,
                "sens": sens,
                "rand": rand,
                "mean": sum(rand) / len(rand),
                "points": [r["node"] for r in chosen[:k]],
            }
        )
        log(f"K={k}: sensitivity {sens:.2f} dB; random " + ", ".join(f"{v:.2f}" for v in rand))

    all_float = kept(names)  # the fallback is exact: every point in float must give the FP32 features
    alone = [(r["node"], kept([r["node"]])) for r in ranked[:4]]
    log(
        f"all {len(names)} points in float: {all_float:.2f} dB; top 4 each alone in float: "
        + ", ".join(f"{n} {v:.2f}" for n, v in alone)
    )

    lines = [
        "| K | most sensitive in float: feature QSNR dB | random K in float: mean dB | "
        "random, seeds 0 / 1 / 2 dB | points kept (sensitivity) |",
        "|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {_db(r['sens'])} | {_db(r['mean'])} | "
            f"{' / '.join(_db(v) for v in r['rand'])} | {', '.join(f'`{p}`' for p in r['points']) or '-'} |"
        )
    table = "\n".join(lines)
    sens_k = [r["sens"] for r in rows]
    monotone = all(b > a for a, b in zip(sens_k, sens_k[1:]))
    beats = all(r["sens"] > r["mean"] for r in rows if r["k"] > 0)
    beats_each = all(r["sens"] > max(r["rand"]) for r in rows if r["k"] > 0)
    verdict = (
        f"Acceptance (K = 1, 2, 4 raise feature QSNR monotonically and by more than random K): "
        f"monotonic **{'yes' if monotone else 'no'}**; above the random mean at every K "
        f"**{'yes' if beats else 'no'}**; above every random seed at every K "
        f"**{'yes' if beats_each else 'no'}**."
    )
    top = ", ".join(f"`{r['node']}` ({r['group']}, {r['output_qsnr_db_isolated']:.2f} dB)" for r in ranked[:6])
    total = time.perf_counter() - t_start
    versions = ", ".join(f"{d} {_version(d)}" for d in ("torch", "timm", "fxquant"))
    body = "\n".join(
        [
            f"## keep_float: sensitivity-ranked float fallback on DINOv2 ViT-S/14 (CPU, {args.qconfig})",
            "",
            f"Command: `{command}`  ",
            f"Date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; {torch.get_num_threads()} torch "
            f"thread(s), {platform.machine()} Python {platform.python_version()}; compile {compile_s:.0f} s, "
            f"ranking {rank_s:.0f} s, total {total:.0f} s  ",
            f"Versions: {versions}",
            "",
            "Model: timm `vit_small_patch14_dinov2` with the real DINOv2 weights (as in the DINOv2 section), "
            f"qconfig `{args.qconfig}`, calibration = foolbox photos 0-9. Feature QSNR over the (10, 384) final-norm cls "
            "features of photos 10-19 against FP32. Selection as `fxquant.compile(keep_float=K)` does it, on the "
            f"first calibration batch (photos 0-{CALIB_BATCH - 1}): every point ranked by the output QSNR when it "
            f"alone quantizes ({len(names)} points), then greedy forward selection among the "
            f"{max(2 * max(KS), max(KS) + 4)} most sensitive (each pick the one whose fallback, with the picks "
            "before it, raises the output QSNR most; stop when none does). Picks and their calibration-batch "
            "QSNR: "
            + ", ".join(f"`{r['node']}` {r['output_qsnr_db_kept']:.2f} dB" for r in chosen)
            + f" (choosing took {choose_s:.0f} s). Random baseline: K points drawn uniformly "
            "(`random.Random(seed).sample`) from all points, seeds 0, 1, 2.",
            "",
            table,
            "",
            verdict,
            "",
            f"Most sensitive points (output QSNR when quantized alone, photos 0-{CALIB_BATCH - 1}): {top}.",
            "",
            f"Checks: all {len(names)} points in float give {_db(all_float)} dB (the fallback itself is exact). "
            f"Each of the top 4 alone in float (every other point quantized), evaluation photos, vs {_db(base)} dB with "
            "none: " + ", ".join(f"`{n}` {_db(v)} dB" for n, v in alone) + f". Quantizing only the most sensitive "
            f"point leaves the output at {ranked[0]['output_qsnr_db_isolated']:.1f} dB QSNR (photos "
            f"0-{CALIB_BATCH - 1}), vs {_db(base)} dB with all {len(names)} points quantized."
            + (
                ""
                if monotone
                else " The points' errors do not add up independently: removing one point's error can "
                "lower the end-to-end QSNR (errors that partly cancelled), so an isolated ranking does not predict the "
                "joint effect of several fallbacks."
            ),
        ]
    )
    print()
    print(body)
    if args.write:
        from bench.markdown import replace_section

        replace_section("sensitivity" if args.qconfig == "w8a8" else f"sensitivity_{args.qconfig}", body)
        log("wrote the sensitivity section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
