"""ONNX export of a compiled fake-quant model as a QDQ graph that ONNX Runtime runs.

``export_onnx(qm, path, example_inputs)`` copies the GraphModule, swaps each quantization
module for an export twin and traces it with torch's TorchScript-based ONNX exporter
(``dynamo=False``: in torch 2.14 the dynamo exporter needs ``onnxscript`` and lowers
fake-quant ops to plain arithmetic; the TorchScript path keeps our ``symbolic`` methods,
so each point becomes exactly the ONNX nodes chosen here):

- a uniform activation point of at most 8 bits -> ``QuantizeLinear -> DequantizeLinear``
  (uint8 when ``qmin >= 0``, else int8; per-axis scales and zero points for channel-,
  head- and group-wise points, on the point's own axis: the last dimension of (B, N, C)
  activations, axis 1 of (B, H, N, d) attention tensors). A grid narrower than its
  container (e.g. 4 bits in uint8) is clipped in float first, which gives the same codes;
- a quantized weight -> its integer codes as an int8/uint8 initializer followed by a
  per-axis ``DequantizeLinear`` (axis 0 of a conv weight; a Linear's codes are stored
  transposed as (in, out) with axis 1, so ``MatMul`` reads them directly);
- a log2 point and a uniform point wider than 8 bits -> ordinary ops
  (Div/Log/Round/Clip/Pow/Where), the same arithmetic as :mod:`fxquant.quant.quantizers`;
- a folded ``post_scale`` -> a ``Mul`` by a constant.

Anything fxquant-specific that is not listed (an observer, an integer-backend module) is
refused with an error that names the node. onnx is imported only when exporting.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxqError
from fxquant.io.fd_capture import captured_output
from fxquant.io.onnx_checks import OnnxExportError, check_file, check_opset, export_failure, writable_path
from fxquant.ir.patterns import is_scale_transparent, submodule
from fxquant.quant.log_quantizers import log_step
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize
from fxquant.runtime.fake_quant import FakeQuantize, ObserverModule, QuantConv2d, QuantLinear
from fxquant.runtime.integer import code_dtype_for

__all__ = ["export_onnx", "OnnxExportError", "to_exportable", "ONNX_OPSET"]

ONNX_OPSET = 17  # per-axis Q/DQ needs 13; 17 adds LayerNormalization
INPUT_NAME, OUTPUT_NAME = "images", "output"


# ------------------------------------------------------------------------------ Q/DQ ops
def _container(qmin: int, qmax: int) -> torch.dtype | None:
    """The 8-bit ONNX integer type that holds every code of [qmin, qmax], or None."""
    return code_dtype_for(qmin, qmax, prefer=torch.uint8)


class _QuantizeDequantize(torch.autograd.Function):
    """Forward: fxquant's own uniform fake-quantize; ONNX: QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis: int, qmin: int, qmax: int):  # noqa: ARG004
        qp = QParams(scale, zero_point.float(), qmin, qmax, axis if scale.dim() else None)
        return fake_quantize(x, qp)

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis: int, qmin: int, qmax: int):  # noqa: ARG004
        kwargs = {"axis_i": axis} if axis is not None and axis >= 0 else {}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


class _Dequantize(torch.autograd.Function):
    """Forward: integer codes -> float; ONNX: DequantizeLinear (per-axis when the scale is 1-d)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):  # noqa: ARG004
        view = [1] * codes.dim()
        if scale.dim():
            view[axis] = scale.numel()
        return (codes.float() - zero_point.float().reshape(view)) * scale.reshape(view)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


# ------------------------------------------------------------------------- export twins
class OnnxFakeQuantize(nn.Module):
    """A frozen FakeQuantize as exportable ops; same values as the FakeQuantize in torch."""

    def __init__(self, fq: FakeQuantize, name: str):
        super().__init__()
        qp: QParams = fq.qparams
        self.name, self.method, self.post_scale = name, fq.method, float(fq.post_scale)
        self.qmin, self.qmax, self.axis = qp.qmin, qp.qmax, qp.axis
        self.per_channel = qp.per_channel
        self.register_buffer("scale", qp.scale.clone())
        container = _container(qp.qmin, qp.qmax) if fq.method == "uniform" else None
        self.qdq = container is not None
        self.container = container
        zp = qp.zero_point.round()
        self.register_buffer("zero_point", zp.to(container) if container is not None else zp.clone())
        if self.qdq:
            info = torch.iinfo(container)
            self.narrow = (qp.qmin, qp.qmax) != (info.min, info.max)
            self.register_buffer("clip_lo", (qp.qmin - zp) * qp.scale)
            self.register_buffer("clip_hi", (qp.qmax - zp) * qp.scale)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            return t
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = t.numel()
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qdq:
            if self.narrow:  # same codes as clamping them to [qmin, qmax]
                x = torch.minimum(torch.maximum(x, self._view(self.clip_lo, x)), self._view(self.clip_hi, x))
            axis = self.axis % x.dim() if self.per_channel else None
            y = _QuantizeDequantize.apply(x, self.scale, self.zero_point, axis, self.qmin, self.qmax)
        elif self.method == "log2":
            y = self._log2(x)
        elif self.method != "uniform":  # log_sqrt2 and the adaptive bases
            y = self._log_step(x, log_step(self.method))
        else:
            y = self._uniform_ops(x)
        return y * self.post_scale if self.post_scale != 1.0 else y

    def _uniform_ops(self, x: torch.Tensor) -> torch.Tensor:
        """Wider than 8 bits: round/clamp as ordinary ops (no ONNX 8-bit container fits)."""
        scale, zp = self._view(self.scale, x), self._view(self.zero_point, x)
        q = torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax)
        return (q - zp) * scale

    def _log2(self, x: torch.Tensor) -> torch.Tensor:
        """fxquant.quant.quantizers' log2 layout: value ``scale * 2**-m``, the code ``qmax`` means 0."""
        scale = self._view(self.scale, x)
        signed = self.qmin < 0
        magnitude = torch.abs(x) if signed else torch.clamp(x, min=0.0)
        # log2(0) = -inf -> the zero code after negation and clamping, as in quantize_log2
        m = torch.clamp(torch.round(-torch.log2(magnitude / scale)), 0, self.qmax)
        value = torch.where(m >= self.qmax, torch.zeros_like(m), scale * torch.pow(2.0, -m))
        return torch.where(x < 0, -value, value) if signed else value

    def _log_step(self, x: torch.Tensor, step) -> torch.Tensor:
        """fxquant.quant.log_quantizers' layout: value ``scale * 2**(-m p/k)`` as a power of two
        times ``2**(-f/k)``, the code ``qmax`` means 0."""
        scale = self._view(self.scale, x)
        signed = self.qmin < 0
        magnitude = torch.abs(x) if signed else torch.clamp(x, min=0.0)
        m = torch.clamp(torch.round(-torch.log2(magnitude / scale) / float(step)), 0, self.qmax)
        p, k = step.numerator, step.denominator
        shift = torch.floor(m * p / k)
        value = scale * torch.pow(2.0, -shift) * torch.pow(2.0, -(m * p - shift * k) / k)
        value = torch.where(m >= self.qmax, torch.zeros_like(m), value)
        return torch.where(x < 0, -value, value) if signed else value

    def extra_repr(self) -> str:
        kind = "QDQ" if self.qdq else f"{self.method} ops"
        return f"{self.name}: {kind} [{self.qmin}, {self.qmax}] axis={self.axis} post_scale={self.post_scale:g}"


def _weight_buffers(module: nn.Module, qp: QParams, codes: torch.Tensor, name: str, axis: int):
    container = _container(qp.qmin, qp.qmax)
    if container is None:
        raise OnnxExportError(
            f"node '{name}': weight grid [{qp.qmin}, {qp.qmax}] does not fit an 8-bit ONNX "
            "integer type; quantize weights to at most 8 bits to export them"
        )
    scale = qp.scale.clone()
    zp = qp.zero_point.round().to(container)
    if not qp.per_channel:
        scale, zp = scale.reshape(1).expand(codes.shape[axis]).clone(), zp.reshape(1).expand(codes.shape[axis]).clone()
    module.register_buffer("weight_codes", codes.to(container).contiguous())
    module.register_buffer("weight_scale", scale)
    module.register_buffer("weight_zero_point", zp)
    module.weight_axis = axis


class OnnxQuantLinear(nn.Module):
    """int8 codes stored as (in, out) -> DequantizeLinear(axis 1) -> MatMul (+ bias)."""

    def __init__(self, ql: QuantLinear, name: str):
        super().__init__()
        qp = ql.weight_qparams
        if qp.per_channel and qp.axis % 2 != 0:
            raise OnnxExportError(
                f"node '{name}': weight scales along axis {qp.axis}; only per-output-channel "
                "(axis 0) weight scales are exported"
            )
        # transposed codes (in, out): MatMul's B input, per-axis along its output columns
        _weight_buffers(self, qp, ql.weight_codes.t(), name, axis=1)
        self.bias = None if ql.bias is None else nn.Parameter(ql.bias.detach().clone())
        self.float_input = False

    def mark_float_input(self) -> None:
        """The input is not quantized (a weight-only point): keep the codes as (out, in) and
        transpose after DequantizeLinear. ORT would otherwise fuse DQ -> MatMul into
        ``MatMulNBits``, which by default quantizes the float input on the fly (accuracy
        level 4), a rounding the fake-quant graph does not have."""
        if not self.float_input:
            self.weight_codes = self.weight_codes.t().contiguous()
            self.weight_axis, self.float_input = 0, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Dequantize.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis)
        if self.float_input:  # the weight as MatMul's A input: not a MatMulNBits pattern
            y = torch.matmul(w, x.transpose(-1, -2)).transpose(-1, -2)
        else:
            y = torch.matmul(x, w)
        return y + self.bias if self.bias is not None else y


class OnnxQuantConv2d(nn.Module):
    """int8 codes (out, in, kh, kw) -> DequantizeLinear(axis 0) -> Conv."""

    def __init__(self, qc: QuantConv2d, name: str):
        super().__init__()
        qp = qc.weight_qparams
        if qp.per_channel and qp.axis % qc.weight_codes.dim() != 0:
            raise OnnxExportError(
                f"node '{name}': weight scales along axis {qp.axis}; only per-output-channel "
                "(axis 0) weight scales are exported"
            )
        _weight_buffers(self, qp, qc.weight_codes, name, axis=0)
        self.stride, self.padding, self.dilation, self.groups = qc.stride, qc.padding, qc.dilation, qc.groups
        self.bias = None if qc.bias is None else nn.Parameter(qc.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Dequantize.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_axis)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------------------- conversion
def _output_names(gm: fx.GraphModule) -> list[str]:
    """The keys of a dict output (a transformers model's ModelOutput fields), else ``output``."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return [str(key) for key in output] if isinstance(output, dict) else [OUTPUT_NAME]


class _Positional(nn.Module):
    """Calls the graph with positional inputs only: traced graphs carry optional arguments
    (timm's ``attn_mask``, ``is_causal``) that the TorchScript exporter would turn into inputs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.gm(*inputs)


# fxquant modules made of ordinary torch ops, which export as they are: a point left in float
# (fxquant.debug), Log-Int-Softmax and its other log bases (integer exp and codes as Floor/Log/Pow/Where) and
# rotate's online Hadamard transform (Reshape/Slice/Add/Sub/Concat)
_EXPORT_AS_IS = {"FloatPoint", "LogIntSoftmax", "LogBaseSoftmax", "BlockHadamard"}


def _export_twin(module: nn.Module, name: str) -> nn.Module | None:
    """The export twin of a quantization module; None for modules that export as they are."""
    if isinstance(module, FakeQuantize):
        return OnnxFakeQuantize(module, name)
    if isinstance(module, QuantLinear):
        return OnnxQuantLinear(module, name)
    if isinstance(module, QuantConv2d):
        return OnnxQuantConv2d(module, name)
    if isinstance(module, ObserverModule):
        raise OnnxExportError(
            f"node '{name}' is still an observer: export a compiled (lowered) model, "
            "the result of fxquant.compile or fxquant.load"
        )
    if type(module).__module__.startswith("fxquant.") and type(module).__name__ not in _EXPORT_AS_IS:
        raise OnnxExportError(
            f"node '{name}': {type(module).__name__} has no ONNX export; export a model compiled with backend='fake'"
        )
    return None


def to_exportable(qm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``qm`` whose quantization modules are their export twins (``qm`` is unchanged).

    In torch, the copy computes what ``qm`` computes (same fake-quant arithmetic, weights
    dequantized from the same codes); only how it exports differs.
    """
    if not isinstance(qm, fx.GraphModule):
        raise OnnxExportError(
            f"export_onnx needs the GraphModule returned by fxquant.compile or fxquant.load, got {type(qm).__name__}"
        )
    gm = copy.deepcopy(qm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        twin = _export_twin(gm.get_submodule(str(node.target)), node.name)
        if twin is not None:
            gm.add_submodule(str(node.target), twin)
    _requantize_gemm_inputs(gm)
    gm.recompile()
    return gm.eval()


def _requantize_gemm_inputs(gm: fx.GraphModule) -> None:
    """Repeat a point's Q/DQ right before a quantized Linear/Conv it reaches only through
    reshapes and selections (ViT's class-token ``x[:, 0]`` before the head); a Linear whose
    input is not on one per-tensor grid keeps float compute (``mark_float_input``).

    ONNX Runtime fuses ``DequantizeLinear -> MatMul`` into an integer GEMM only when the
    DequantizeLinear feeds the MatMul directly; otherwise it lowers the int8 weight alone to
    ``MatMulNBits``, which by default (accuracy level 4) re-quantizes the float input per
    block and costs several dB. Quantize-dequantize is idempotent on values already on the
    grid (codes are recovered exactly by division), so the repeat changes no value.
    """
    for node in list(gm.graph.nodes):
        module = submodule(gm, node)
        if not isinstance(module, (OnnxQuantLinear, OnnxQuantConv2d)) or not node.args:
            continue
        direct = node.args[0]
        source = direct
        while isinstance(source, fx.Node) and is_scale_transparent(gm, source) and source.args:
            source = source.args[0]
        point = submodule(gm, source) if isinstance(source, fx.Node) else None
        # integer GEMM inputs need one scale per tensor, and the value exactly on its grid
        quantized = (
            isinstance(point, OnnxFakeQuantize) and point.qdq and not point.per_channel and point.post_scale == 1.0
        )
        if not quantized:
            if isinstance(module, OnnxQuantLinear):
                module.mark_float_input()
            continue
        if source is direct:
            continue
        with gm.graph.inserting_before(node):
            again = gm.graph.call_module(str(source.target), (direct,))
        again.meta.update(source.meta)
        node.replace_input_with(direct, again)


def export_onnx(
    qm: fx.GraphModule,
    path: str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    opset: int = ONNX_OPSET,
    dynamic_batch: bool = True,
    check: bool = True,
) -> Path:
    """Write ``qm`` as a QDQ ONNX model at ``path`` and return the path.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (shape and dtype
    are fixed in the file except, with ``dynamic_batch``, the first dimension). With
    ``check`` the file is validated by ``onnx.checker.check_model``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    check_opset(opset)
    gm = to_exportable(qm)
    path = writable_path(Path(path))
    names = [INPUT_NAME] if len(example_inputs) == 1 else [f"{INPUT_NAME}_{i}" for i in range(len(example_inputs))]
    outputs = _output_names(gm)
    dynamic_axes = {n: {0: "batch"} for n in [*names, *outputs]} if dynamic_batch else None
    failure, log = None, ""
    # the exporter's deprecation and tracer warnings are ignored; what it prints from C++ (the
    # whole TorchScript IR when it fails) is captured and, on failure, written beside the file
    with warnings.catch_warnings(), captured_output() as exporter_output:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _Positional(gm),
                example_inputs,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except FxqError:
            raise
        except Exception as exc:  # torch.onnx raises many types (SymbolicValueError, RuntimeError, ...)
            failure, log = exc, exporter_output()
    if failure is not None:
        raise export_failure(failure, path, log) from failure
    if check:
        check_file(path)
    return path


def qdq_summary(path: str | Path) -> dict[str, int]:
    """Op-type counts of an ONNX file (for tests and docs)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
