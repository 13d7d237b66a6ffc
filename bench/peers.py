"""Peer post-training quantizers to compare fxquant with, on CPU.

Every peer has the signature ``peer(model, calib, eval_x) -> torch.Tensor``: ``model`` is
an FP32 ``nn.Module`` in eval mode (never modified: peers work on a deep copy), ``calib``
and ``eval_x`` are (N, 3, H, W) float tensors; the peer quantizes with ``calib`` and
returns the quantized model's output on ``eval_x`` as a float32 tensor.  A peer that
cannot run raises :class:`PeerUnavailable` (missing package, an install that would
change torch) or lets the underlying error through; the caller records the message.

Peers:

* ONNX Runtime static QDQ int8 (``quantize_static``, MinMax, per-channel weights):
  ``ort_matmul_gemm`` quantizes op types MatMul and Gemm (this includes the attention
  matmuls q@kT and attn@V, which are MatMul nodes in the exported graph);
  ``ort_linear_weights`` only the MatMul/Gemm nodes whose second input is a constant
  weight, i.e. the nn.Linear layers; ``ort_all_ops`` has no op-type restriction.
  ``ort_fp32`` runs the exported FP32 graph unquantized (an export check).  Activations
  are QUInt8 by default; asymmetric QInt8 has the same grid shifted by 128, so it gives
  identical values (checked: 17.19 dB both on DINOv2 ViT-S/14) and is not listed twice.
* torch.ao FX graph mode (``prepare_fx``/``convert_fx``, ``get_default_qconfig_mapping("x86")``):
  ``torch_ao_fx`` (all ops the x86 backend config supports) and ``torch_ao_fx_linear``
  (only ``nn.Linear``, with the same x86 qconfig).
* torchao PT2E with ``X86InductorQuantizer`` (default static config): ``torchao_pt2e``.

Each peer also has a builder, ``build_<peer>(model, calib) -> run``, that quantizes once and
returns ``run(x) -> torch.Tensor`` to evaluate many batches (``BUILDERS``); the outputs
can be logits as well as features (the model's forward output, whatever its width).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn


class PeerUnavailable(RuntimeError):
    """The peer cannot run in this environment (the message says why)."""


# Seconds of the last peer call: "quantize" (export/prepare + calibrate + convert) and "run"
# (the evaluation forward). Filled by every peer so the caller can report both.
last_timing: dict[str, float] = {}


class _Clock:
    def __init__(self):
        last_timing.clear()
        self._t = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        last_timing[key] = last_timing.get(key, 0.0) + now - self._t
        self._t = now


CALIB_BATCH = 10  # all 10 calibration photos in one forward unless a peer needs otherwise


def _batches(x: torch.Tensor, size: int = CALIB_BATCH):
    return list(torch.split(x, size))


def _no_fused_attn(model: nn.Module) -> nn.Module:
    """Deep copy with timm's fused SDPA switched off (explicit q@kT, softmax, @v)."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return m


# ------------------------------------------------------------------ ONNX Runtime
def _onnx_export(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """FP32 export with a dynamic batch axis; legacy TorchScript exporter (no onnxscript needed)."""
    m = _no_fused_attn(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (example,),
            path,
            input_names=["input"],
            output_names=["features"],
            dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )


def _ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _ort_runner(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    sess = _ort_session(path)  # the session holds the graph in memory: the file may go
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = sess.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(np.ascontiguousarray(out)).float()

    return run


def _ort_run(path: str, eval_x: torch.Tensor) -> torch.Tensor:
    return _ort_runner(path)(eval_x)


def _linear_node_names(path: str) -> list[str]:
    """MatMul/Gemm nodes whose weight (input 1) is an initializer: the nn.Linear layers."""
    import onnx

    g = onnx.load(path).graph
    inits = {i.name for i in g.initializer}
    consts = {n.output[0] for n in g.node if n.op_type == "Constant"}
    return [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and (n.input[1] in inits or n.input[1] in consts)]


def _build_ort_static(
    model, calib, *, op_types=None, linear_only=False, activation_type: str = "QUInt8"
) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        raise PeerUnavailable(f"onnx/onnxruntime not installed: {e}") from e

    class Reader(CalibrationDataReader):
        def __init__(self, x: torch.Tensor, name: str):
            self._it = iter([{name: b.numpy().astype(np.float32)} for b in _batches(x, 1)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="fxq_ort_") as tmp:
        fp32, int8 = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        _onnx_export(model, calib[:1], fp32)
        nodes = _linear_node_names(fp32) if linear_only else None
        if linear_only and not nodes:
            raise RuntimeError("no MatMul/Gemm node with a constant weight in the exported graph")
        quantize_static(
            fp32,
            int8,
            Reader(calib, "input"),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=getattr(QuantType, activation_type),
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return _ort_runner(int8)


def build_ort_fp32(model, calib) -> Callable[[torch.Tensor], torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="fxq_ort_") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        _onnx_export(model, calib[:1], fp32)
        return _ort_runner(fp32)


def build_ort_matmul_gemm(model, calib, activation_type: str = "QUInt8"):
    """op_types_to_quantize=["MatMul", "Gemm"]: Linears plus attention's activation matmuls."""
    return _build_ort_static(model, calib, op_types=["MatMul", "Gemm"], activation_type=activation_type)


def build_ort_linear_weights(model, calib, activation_type: str = "QUInt8"):
    """Only MatMul/Gemm nodes with a constant weight (the nn.Linear layers)."""
    return _build_ort_static(
        model, calib, op_types=["MatMul", "Gemm"], linear_only=True, activation_type=activation_type
    )


def build_ort_all_ops(model, calib, activation_type: str = "QUInt8"):
    """No op-type restriction: every op ONNX Runtime's QDQ quantizer supports."""
    return _build_ort_static(model, calib, op_types=None, activation_type=activation_type)


def _timed(build, model, calib, eval_x, **kwargs) -> torch.Tensor:
    """Build (quantize) then run on ``eval_x``, filling :data:`last_timing`."""
    clock = _Clock()
    run = build(model, calib, **kwargs)
    clock.lap("quantize")
    with torch.no_grad():
        out = run(eval_x).float()
    clock.lap("run")
    return out


def ort_fp32(model, calib, eval_x) -> torch.Tensor:
    """The exported FP32 ONNX graph on onnxruntime: checks the export itself."""
    return _timed(build_ort_fp32, model, calib, eval_x)


def ort_matmul_gemm(model, calib, eval_x, activation_type: str = "QUInt8") -> torch.Tensor:
    return _timed(build_ort_matmul_gemm, model, calib, eval_x, activation_type=activation_type)


def ort_linear_weights(model, calib, eval_x, activation_type: str = "QUInt8") -> torch.Tensor:
    return _timed(build_ort_linear_weights, model, calib, eval_x, activation_type=activation_type)


def ort_all_ops(model, calib, eval_x, activation_type: str = "QUInt8") -> torch.Tensor:
    return _timed(build_ort_all_ops, model, calib, eval_x, activation_type=activation_type)


# ------------------------------------------------------------------ torch.ao FX
def _build_torch_ao_fx(model, calib, *, linear_only: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from torch.ao.quantization import QConfigMapping, get_default_qconfig, get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:
        raise PeerUnavailable(f"torch.ao.quantization.quantize_fx is not available: {e}") from e
    if "x86" not in torch.backends.quantized.supported_engines:
        raise PeerUnavailable(f"quantized engine x86 not supported here: {torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = "x86"
    m = _no_fused_attn(model)
    if linear_only:
        mapping = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig("x86"))
    else:
        mapping = get_default_qconfig_mapping("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(m, mapping, example_inputs=(calib[:1],))
        with torch.no_grad():
            for b in _batches(calib):
                prepared(b)
        quantized = convert_fx(prepared)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return quantized(x).float()

    return run


def build_torch_ao_fx(model, calib):
    return _build_torch_ao_fx(model, calib, linear_only=False)


def build_torch_ao_fx_linear(model, calib):
    return _build_torch_ao_fx(model, calib, linear_only=True)


def torch_ao_fx(model, calib, eval_x) -> torch.Tensor:
    return _timed(build_torch_ao_fx, model, calib, eval_x)


def torch_ao_fx_linear(model, calib, eval_x) -> torch.Tensor:
    return _timed(build_torch_ao_fx_linear, model, calib, eval_x)


# ------------------------------------------------------------------ torchao PT2E
def build_torchao_pt2e(model, calib) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.export (dynamic batch where the model allows it, else batch 1) ->
    prepare_pt2e(X86InductorQuantizer) -> calibrate -> convert_pt2e; run eagerly."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise PeerUnavailable(f"torchao (PT2E) is not importable: {e}") from e
    m = copy.deepcopy(model).eval()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = calib[:2]
        try:
            dims = ({0: torch.export.Dim("batch", min=1, max=4096)},)
            exported = torch.export.export(m, (example,), dynamic_shapes=dims).module()
            batch = None
        except Exception:  # noqa: BLE001 - a model that specialises the batch: export at 1
            exported = torch.export.export(m, (calib[:1],)).module()
            batch = 1
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for b in _batches(calib, batch or CALIB_BATCH):
                prepared(b)
        converted = convert_pt2e(prepared)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if batch is None:
                return converted(x).float()
            return torch.cat([converted(b) for b in _batches(x, batch)]).float()

    return run


def torchao_pt2e(model, calib, eval_x) -> torch.Tensor:
    return _timed(build_torchao_pt2e, model, calib, eval_x)


PEERS: dict[str, Callable] = {
    "onnxruntime FP32 export (no quantization)": ort_fp32,
    "onnxruntime QDQ int8, op_types MatMul+Gemm (Linears + attention matmuls)": ort_matmul_gemm,
    "onnxruntime QDQ int8, Linear layers only (MatMul/Gemm with constant weight)": ort_linear_weights,
    "onnxruntime QDQ int8, all ops": ort_all_ops,
    "torch.ao FX x86, default qconfig mapping": torch_ao_fx,
    "torch.ao FX x86, nn.Linear only": torch_ao_fx_linear,
    "torchao PT2E X86InductorQuantizer (default config)": torchao_pt2e,
}


# Short keys for builders (quantize once, run many batches); same peers as PEERS.
BUILDERS: dict[str, tuple[str, Callable]] = {
    "ort_fp32": ("onnxruntime FP32 export (no quantization)", build_ort_fp32),
    "ort_matmul_gemm": (
        "onnxruntime QDQ int8, op_types MatMul+Gemm (Linears + attention matmuls)",
        build_ort_matmul_gemm,
    ),
    "ort_linear": (
        "onnxruntime QDQ int8, Linear layers only (MatMul/Gemm with constant weight)",
        build_ort_linear_weights,
    ),
    "ort_all_ops": ("onnxruntime QDQ int8, all ops", build_ort_all_ops),
    "torch_ao_fx": ("torch.ao FX x86, default qconfig mapping", build_torch_ao_fx),
    "torch_ao_fx_linear": ("torch.ao FX x86, nn.Linear only", build_torch_ao_fx_linear),
    "torchao_pt2e": ("torchao PT2E X86InductorQuantizer (default config)", build_torchao_pt2e),
}
