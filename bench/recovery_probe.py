"""The rebuilt presets on the DINOv2 linear probe: all 2000 test images, two heads.

    python -m bench.recovery_probe [--methods w8a8,w6a6] [--test 2000] [--calib 128] [--write]

DINOv2 ViT-S/14 with real weights (bench.real_models); Fashion-MNIST at 224 px
(bench.linear_probe). Heads fitted on FP32 features of training images 0-1999: the
logistic-regression probe of bench.linear_probe and a weighted k-NN (k = 20, cosine
similarity, votes weighted by exp(sim / 0.07), the DINOv2 paper's k-NN). Calibration:
training images 2000 .. 2000 + ``--calib`` (never test images). Evaluation: test images
0 .. ``--test``. Each method's features are kept in ``bench/cache/recovery_probe/`` so an
interrupted run resumes; ``--write`` puts the table of every cached method into
BENCHMARKS.md. Methods are preset names, ``name@int`` for the integer backend, or
``name-before`` for the preset as it shipped before the recovery passes (round-to-nearest,
SmoothQuant 0.5, no rotate/gptq/bias_correction), or ``name+key+key`` for a preset with
recovery keys turned on (``w8a8+rotate+bias_correction``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import fxquant
from bench.accuracy import qsnr_db
from bench.linear_probe import CACHE_DIR, batched, fp32_features, probe_images, train_probe
from bench.markdown import publish
from bench.real_models import load_dinov2_vits14

N_TRAIN = 2000
KNN_K, KNN_T = 20, 0.07
BEFORE = {"rotate": False, "gptq": False, "bias_correction": False, "smooth_alpha": 0.5}
DEFAULT_METHODS = "w8a8,w6a6,w4a8,int8_all,w4a4"


def knn_head(train_feats: torch.Tensor, train_labels: torch.Tensor, classes: int):
    bank = F.normalize(train_feats.double(), dim=1)

    def head(feats: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(feats.double(), dim=1) @ bank.T
        top, index = sims.topk(KNN_K, dim=1)
        votes = torch.zeros(len(feats), classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[index], (top / KNN_T).exp())
        return votes

    return head


def qconfig_of(method: str):
    """``preset``, ``preset-before`` or ``preset+key+key`` (recovery keys turned on, e.g.
    ``w8a8+rotate+bias_correction``; ``rotate`` turns SmoothQuant off), then ``@int``."""
    name, _, _ = method.partition("@")
    preset, *keys = name.split("+")
    if preset.endswith("-before"):
        return {**fxquant.load_qconfig(preset[: -len("-before")]).to_dict(), **BEFORE}
    if not keys:
        return preset
    config = fxquant.load_qconfig(preset).to_dict()
    for key in keys:
        config[key] = True
        if key == "rotate":
            config["smooth_alpha"] = None
    return config


def features_of(method: str, model, calib, test_x, cache_dir) -> dict:
    path = cache_dir / f"{method}_{len(calib)}_{len(test_x)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    backend = "int" if method.endswith("@int") else "fake"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = fxquant.compile(
            model, qconfig_of(method), calib_data=list(torch.split(calib, 16)), backend=backend, numeric_diff=False
        )
    compile_s = time.perf_counter() - start
    pass_s = {p.name: round(p.seconds, 1) for p in qm.report.passes}
    start = time.perf_counter()
    feats = batched(qm, test_x, batch=20, desc=method)
    blob = {"features": feats, "compile_s": compile_s, "eval_s": time.perf_counter() - start, "passes": pass_s}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return blob


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_dinov2_vits14().eval()
    train_f, train_y = fp32_features(model, "train", N_TRAIN)
    test_f, test_y = fp32_features(model, "test", args.test)
    probe, l2, _ = train_probe(train_f, train_y)
    knn = knn_head(train_f, train_y, int(train_y.max()) + 1)
    calib, _ = probe_images("train", args.calib, start=N_TRAIN)
    test_x, _ = probe_images("test", args.test)
    cache_dir = CACHE_DIR / "recovery_probe"

    def top1(head, feats):
        with torch.no_grad():
            return 100 * float((head(feats).argmax(1) == test_y).float().mean())

    fp_linear, fp_knn = top1(probe, test_f), top1(knn, test_f)
    lines = [
        "## Rebuilt presets on the DINOv2 linear probe and k-NN (all 2000 test images, CPU)",
        "",
        f"Command: `python -m bench.recovery_probe --write` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"1 thread, other jobs sharing the 2 cores: times are indicative). DINOv2 ViT-S/14 (real weights); "
        f"Fashion-MNIST at 224 px; heads fitted on FP32 features of training images 0-{N_TRAIN - 1}: logistic "
        f"regression (L2 {l2:g}) and weighted k-NN (k {KNN_K}, T {KNN_T}); calibration: {args.calib} training "
        f"images from {N_TRAIN}; evaluation: test images 0-{args.test - 1}. FP32: linear {fp_linear:.2f} %, "
        f"k-NN {fp_knn:.2f} %. One image is {100 / args.test:.2f} points. `-before`: the preset as it shipped "
        "before the recovery passes (round-to-nearest, SmoothQuant 0.5).",
        "",
        "| method | backend | linear top-1 % | Δ linear | k-NN top-1 % | Δ k-NN | feature QSNR dB | compile s "
        "| passes s (rotate / gptq / bias_correction) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in args.methods.split(","):
        blob = features_of(method, model, calib, test_x, cache_dir)
        feats = blob["features"]
        lin, kn = top1(probe, feats), top1(knn, feats)
        per_pass = " / ".join(str(blob["passes"].get(n, "-")) for n in ("rotate", "gptq", "bias_correction"))
        backend = "int" if method.endswith("@int") else "fake"
        lines.append(
            f"| `{method.partition('@')[0]}` | {backend} | {lin:.2f} | {lin - fp_linear:+.2f} | {kn:.2f} | "
            f"{kn - fp_knn:+.2f} | {qsnr_db(test_f, feats):.2f} | {blob['compile_s']:.0f} | {per_pass} |"
        )
        print(lines[-1], flush=True)
    publish("recovery_probe", "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
