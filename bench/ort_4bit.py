"""4-bit weights on DINOv2 ViT-S/14: ONNX Runtime's weight-only quantizer against fxquant (issue 15).

    python -m bench.ort_4bit [--write] [--out FILE]

Peer: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` on the FP32
ONNX export of the model (legacy TorchScript exporter, opset 17, input "input", dynamic
batch; every nn.Linear exports as MatMul + Add with a constant weight, which the quantizer
turns into a com.microsoft MatMulNBits node; the attention score matmuls have no constant
operand and the patch-embed Conv is not a MatMul, so both stay FP32). Algorithms:

  * RTN (``RTNWeightOnlyQuantConfig``, the vendored Intel Neural Compressor round-to-nearest),
    block size 32 and 128, symmetric and asymmetric;
  * ORT's own blockwise quantizer (``algo_config=None``, i.e. ``DefaultWeightOnlyQuantConfig``),
    also round-to-nearest, same four settings;
  * GPTQ (``GPTQWeightOnlyQuantConfig``, vendored INC GPTQ, its update block 128), quantization
    block 128 asymmetric (the default) and symmetric, and block 32 asymmetric, calibrated on
    the 10 calibration photos, one photo per calibration sample.

fxquant rows (fake-quant backend): w4a8 as shipped (which also quantizes activations to 8 bits
and the patch embed to 4 bits), w4a8 with ``gptq: {group_size: 32}``, and weight-only variants
with ORT's scope (every activation group and the patch-embed weight ``enable: false``), with
and without the recovery passes.

Protocol of bench.dinov2_features / bench.gptq_dinov2: the 20 foolbox photos, 0-9 calibrate,
10-19 evaluate; metric = feature QSNR of the final-norm cls token (10, 384) against the FP32
torch model. One torch thread; ORT inference sessions with intra_op_num_threads=1 (the GPTQ
quantizer's internal calibration session uses its own default SessionOptions). The quantize
column is the wall time of the quantizer alone (ORT) or of ``fxquant.compile`` (fxquant).
A method that raises gets its error in the table instead of a number.

Needs onnx and onnxruntime; onnxruntime 1.32's ``matmul_nbits_quantizer`` also imports
``onnx_ir`` (``pip install onnx-ir``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.markdown import publish

TITLE = "## 4-bit weights: ONNX Runtime's weight-only quantizer vs fxquant on DINOv2 ViT-S/14 (feature QSNR, CPU)"


# w8a8's activation groups (w4a8 inherits them); ``enable: false`` leaves each point in float.
ACTIVATION_GROUPS = (
    "norm1",
    "norm2",
    "attn_v_out",
    "mlp_gelu",
    "final_norm",
    "patch_merging_norm",
    "attn_q_out",
    "attn_k_out",
    "attn_v_input",
    "attn_kv_out",
)
# 4-bit weights on the 48 Linears only, as ORT's MatMulNBits quantizer does: activations and the
# patch-embed Conv stay in float.
WEIGHT_ONLY = {
    "extends": "w4a8",
    **{g: {"enable": False} for g in ACTIVATION_GROUPS},
    "patch_embed": {"weight": {"enable": False}},
}
PER_CHANNEL = "4-bit per output channel, sym, OMSE"
GROUP_32 = "4-bit, group 32 along K (gptq), sym"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _ort_features(model_or_path, x: torch.Tensor) -> torch.Tensor:
    sess = _session(model_or_path)
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy().astype(np.float32)})
    return torch.from_numpy(np.ascontiguousarray(out)).float()


def _model_proto(quantizer):
    """The quantized ModelProto (``quantizer.model`` is an ONNXModel wrapper for every algorithm)."""
    m = quantizer.model
    return m.model if hasattr(m, "model") else m


def _count_ops(proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _reader(calib: torch.Tensor):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """One photo per sample; deep-copyable (the quantizer deep-copies it before iterating)."""

        def __init__(self, x: np.ndarray):
            self.x = x
            self.i = 0

        def get_next(self):
            if self.i >= len(self.x):
                return None
            self.i += 1
            return {"input": self.x[self.i - 1 : self.i]}

    return Reader(calib.numpy().astype(np.float32))


def ort_rows(calib: torch.Tensor):
    """(label, weights, MatMulNBitsQuantizer kwargs) for each ONNX Runtime row."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    def desc(block: int, sym: bool) -> str:
        return f"4-bit, block {block} along K, {'sym' if sym else 'asym (zero point)'}"

    def side(sym: bool) -> str:
        return "symmetric" if sym else "asymmetric"

    rows = []
    for block in (32, 128):
        for sym in (True, False):
            rows.append(
                (
                    f"ORT RTN (INC), block {block}, {side(sym)}",
                    desc(block, sym),
                    dict(block_size=block, is_symmetric=sym, algo_config=mnq.RTNWeightOnlyQuantConfig()),
                )
            )
    for block in (32, 128):
        for sym in (True, False):
            rows.append(
                (
                    f"ORT default blockwise quantizer (RTN), block {block}, {side(sym)}",
                    desc(block, sym),
                    dict(block_size=block, is_symmetric=sym, algo_config=None),
                )
            )
    for block, sym in ((128, False), (128, True), (32, False)):
        rows.append(
            (
                f"ORT GPTQ (INC), block {block}, {side(sym)}",
                desc(block, sym),
                dict(
                    block_size=block,
                    is_symmetric=sym,
                    algo_config=mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(calib), block_size=128),
                ),
            )
        )
    return rows


def inc_gptq_check(group: int = 32) -> dict[str, float]:
    """Two properties of the vendored INC GPTQ (``neural_compressor.weight_only``), measured.

    On a random 384 x 64 weight and a correlated random Hessian (where a working GPTQ moves
    many weights off round-to-nearest):

    * ``gptq_vs_rtn``: share of entries where ``gptq`` (asym, ``group``) differs from plain
      asymmetric round-to-nearest on the same groups; and the H-weighted error
      tr((W - Q)^T H (W - Q)) of each (``err_gptq``, ``err_rtn``);
    * ``requant_<scheme>``: ``gptq_quantize`` re-quantizes GPTQ's fake-quantized Q with
      ``quant_tensor`` (min/max of each group of Q) to build MatMulNBits; the share of Q's
      entries that dequant(requant(Q)) moves, per scheme.
    """
    from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

    rng = np.random.default_rng(0)
    k, n = 384, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((4000, k)) @ (np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k))
    h = 2 * x.T @ x / len(x)
    out = {}
    for scheme in ("sym", "asym"):
        q = gptq(w.copy(), h.copy(), num_bits=4, group_size=group, scheme=scheme, blocksize=128)
        codes, scale, zp = quant_tensor(q.T.copy(), 4, group, scheme, "uint")
        deq = (codes.reshape(-1, group).astype(np.float64) - zp.reshape(-1, 1)) * scale.reshape(-1, 1)
        out[f"requant_{scheme}"] = float(np.mean(np.abs(deq.reshape(n, k).T - q) > 1e-5))
        if scheme == "asym":
            g = w.reshape(k // group, group, n).astype(np.float64)
            lo, hi = np.minimum(g.min(1, keepdims=True), 0), np.maximum(g.max(1, keepdims=True), 0)
            step = (hi - lo) / 15
            zero = np.round(-lo / step)
            rtn = (step * (np.clip(np.round(g / step) + zero, 0, 15) - zero)).reshape(k, n)
            out["gptq_vs_rtn"] = float(np.mean(np.abs(q - rtn) > 1e-5))
            out["err_gptq"] = float(np.trace((w - q).T @ h @ (w - q)))
            out["err_rtn"] = float(np.trace((w - rtn).T @ h @ (w - rtn)))
    return out


def run_ort(fp32_path: str, kwargs: dict) -> tuple[object, float]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    start = time.perf_counter()
    q = mnq.MatMulNBitsQuantizer(onnx.load(fp32_path), bits=4, **kwargs)
    q.process()
    seconds = time.perf_counter() - start
    return _model_proto(q), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    parser.add_argument("--out", default=None, help="also write the markdown section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import onnxruntime as ort

    import fxquant
    from bench.dinov2_features import feature_qsnr_db
    from bench.peers import _onnx_export
    from bench.real_data import foolbox_imagenet
    from bench.real_models import load_dinov2_vits14

    model = load_dinov2_vits14().eval()
    images, _, _ = foolbox_imagenet()
    calib, evaluation = images[:10], images[10:]
    with torch.no_grad():
        reference = model(evaluation)

    table: list[str] = []
    notes: list[str] = []
    coverage: list[str] = []
    load_start = os.getloadavg()[0]

    def row(label, weights, acts, db, seconds):
        db_s = db if isinstance(db, str) else f"{db:.2f}"
        sec_s = "-" if seconds is None else f"{seconds:.1f}"
        table.append(f"| {label} | {weights} | {acts} | {db_s} | {sec_s} |")
        log(table[-1])

    with tempfile.TemporaryDirectory(prefix="fxq_ort4_") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        start = time.perf_counter()
        _onnx_export(model, calib[:1], fp32)
        log(f"exported in {time.perf_counter() - start:.1f} s")
        import onnx

        ops = _count_ops(onnx.load(fp32))
        notes.append(
            f"FP32 export: {ops.get('MatMul', 0)} MatMul ({ops.get('Gemm', 0)} Gemm, {ops.get('Conv', 0)} Conv) nodes."
        )
        row(
            "ORT FP32 (export sanity)",
            "FP32",
            "FP32",
            feature_qsnr_db(reference, _ort_features(fp32, evaluation)),
            None,
        )

        try:
            peer_rows = ort_rows(calib)
        except ImportError as e:  # onnxruntime 1.32's matmul_nbits_quantizer imports onnx_ir (pip install onnx-ir)
            peer_rows = []
            row("ORT MatMulNBitsQuantizer", "4-bit", "FP32", f"failed: {type(e).__name__}: {e}", None)
        for label, weights, kwargs in peer_rows:
            try:
                proto, seconds = run_ort(fp32, kwargs)
                n_nbits = _count_ops(proto).get("MatMulNBits", 0)
                db = feature_qsnr_db(reference, _ort_features(proto, evaluation))
                row(f"{label} ({n_nbits} MatMulNBits)", weights, "FP32", db, seconds)
            except Exception as e:  # noqa: BLE001 - a failing peer is a result, recorded as such
                traceback.print_exc()
                msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]
                row(label, weights, "FP32", f"failed: {msg}", None)

    a8 = "8-bit (w8a8's activation points)"
    fx_rows = [
        ("fxquant w4a8 (as shipped: rotate + gptq + bias_correction)", "w4a8", PER_CHANNEL, a8),
        (
            'fxquant {"extends": "w4a8", "gptq": {"group_size": 32}}',
            {"extends": "w4a8", "gptq": {"group_size": 32}},
            GROUP_32,
            a8,
        ),
        (
            "fxquant w4a8, weight-only (activations and patch embed off), no recovery passes",
            {**WEIGHT_ONLY, "rotate": False, "gptq": False, "bias_correction": False},
            PER_CHANNEL,
            "FP32",
        ),
        (
            "fxquant w4a8, weight-only (activations and patch embed off), rotate + gptq + bias_correction",
            WEIGHT_ONLY,
            PER_CHANNEL,
            "FP32",
        ),
        (
            "fxquant w4a8, weight-only (activations and patch embed off), + gptq group_size 32",
            {**WEIGHT_ONLY, "gptq": {"group_size": 32}},
            GROUP_32,
            "FP32",
        ),
    ]
    for label, qconfig, weights, acts in fx_rows:
        try:
            start = time.perf_counter()
            qm = fxquant.compile(model, qconfig, calib_data=calib, diff_inputs=evaluation[:1], progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                db = feature_qsnr_db(reference, qm(evaluation))
            row(label, weights, acts, db, seconds)
            cov = qm.report.weight_coverage or {}
            coverage.append(f"{label}: {cov.get('quantized', 0):,} of {cov.get('total', 0):,}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]
            row(label, weights, acts, f"failed: {msg}", None)

    lines = [
        TITLE,
        "",
        f"Command: `python -m bench.ort_4bit` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, 1 torch thread, ORT intra_op_num_threads=1). Protocol of the DINOv2 "
        "features section: photos 0-9 calibrate, photos 10-19 evaluate; feature QSNR of the final-norm cls "
        "token (10, 384) against the FP32 torch model.",
        "",
        "| method | weight bits / granularity | activations | feature QSNR dB | quantize s |",
        "|---|---|---|---:|---:|",
        *table,
        "",
        "Notes:",
        "",
        f"- {notes[0]} ORT's MatMulNBitsQuantizer replaces only the MatMuls with a constant weight "
        "(the 48 nn.Linear layers); the patch-embed Conv stays FP32 and all activations stay FP32, "
        "whereas fxquant w4a8 as shipped also puts the patch embedding at 4 bits and quantizes activations "
        "to 8 bits; the fxquant weight-only rows match ORT's scope (w4a8 with every activation group and the "
        "patch_embed weight set to enable: false).",
        "- ORT RTN and GPTQ are the Intel Neural Compressor code vendored in onnxruntime.quantization."
        "neural_compressor; GPTQ's own session for collecting layer inputs uses default SessionOptions "
        "(not pinned to one thread). GPTQ calibration: 10 photos, one per sample, percdamp 0.01, no act-order.",
        "- fxquant rows: fake-quant backend, quantize s = the whole fxquant.compile (calibration, "
        "rotate, gptq, bias_correction).",
    ]
    lines.append(
        "- fxquant quantized weight elements (of all Linear/Conv weight elements; ORT's rows quantize the "
        "48 Linears, 21,233,664 elements, and leave the 225,792-element patch-embed Conv in float; rotate adds "
        "one float 384 x 384 Linear, 147,456 elements, to the total): " + "; ".join(coverage) + "."
    )
    lines.append(
        f"- 1-minute load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end of the run "
        f"on this {os.cpu_count()}-CPU machine: the seconds are wall time, under whatever else ran alongside."
    )
    try:
        chk = inc_gptq_check()
        lines.append(
            "- Checks of the vendored INC GPTQ on a random 384 x 64 weight with a correlated random Hessian "
            f"(group 32, `inc_gptq_check`): its asymmetric GPTQ differs from plain round-to-nearest in "
            f"{100 * chk['gptq_vs_rtn']:.1f}% of the weights (H-weighted error {chk['err_gptq']:.1f} vs RTN "
            f"{chk['err_rtn']:.1f}). Its error feedback reads Hinv1[i:, i], a column of the upper-triangular "
            "Cholesky factor, which is zero below the diagonal (reference GPTQ uses the row Hinv1[i, i:]), so no "
            "error reaches the columns not yet quantized and ORT 'GPTQ' is round-to-nearest. The asymmetric GPTQ "
            "row equal to the asymmetric RTN rows is that. Then the packing step re-quantizes the result with "
            "quant_tensor: that moves "
            f"{100 * chk['requant_sym']:.0f}% of the symmetric weights (its symmetric scale, 2 max abs(Q) / 15 of the "
            "already-quantized group, is not GPTQ's grid) and "
            f"{100 * chk['requant_asym']:.0f}% of the asymmetric ones: the symmetric GPTQ rows are rounded twice, "
            "which is why they land below symmetric RTN."
        )
    except Exception as e:  # noqa: BLE001
        lines.append(f"- INC GPTQ check failed: {type(e).__name__}: {e}")
    if any("failed: ValueError: cannot reshape array" in t for t in table):
        lines.append(
            "- The asymmetric INC rows that fail do so when packing the 4-bit zero points "
            "(neural_compressor/weight_only.py make_matmul_weight_only_node): it packs all N x k_blocks zero "
            "points back to back, two per byte, then reshapes to (N, -1), which only works when k_blocks = "
            "K / block is even. With block 128 the K = 384 layers (qkv, proj, fc1) have 3 blocks, so the "
            "reshape raises; block 32 (12 blocks) and ORT's own blockwise quantizer are not affected."
        )
    text = "\n".join(lines) + "\n"
    publish("ort_4bit", text, args.write)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
