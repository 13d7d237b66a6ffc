"""nn.Modules that passes insert into the graph: observers, fake-quant and quantized layers."""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.errors import NodeError
from fxquant.quant.log_quantizers import RESOLVED_LOG_METHODS, LogBaseSearch, log_step, method_for_step
from fxquant.quant.observers import Observer, make_observer
from fxquant.quant.points import QuantPoint
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import dequantize, fake_quantize, quantize
from fxquant.runtime.integer import code_dtype_for
from fxquant.runtime.savable import NUMBER, POINT, QPARAMS, Schema, TensorRule, per_output, savable


class ObserverModule(nn.Module):
    """Passes its input through (times ``post_scale``) and, while observing, records statistics."""

    def __init__(self, point: QuantPoint, name: str, observer: Optional[Observer] = None):
        """``observer``: one already built (and calibrated) for this point; default: a new one."""
        super().__init__()
        self.point = point
        self.point_name = name
        self.observer = (
            observer if observer is not None else make_observer(point.spec, name=name, **point.observer_kwargs())
        )
        self.observing = False
        self.post_scale = 1.0  # a constant multiply folded in by fuse_scales
        spec = point.spec
        # log_adaptive: the histogram its base is chosen from (fxquant.quant.log_quantizers)
        self.log_search = None
        if spec.method == "log_adaptive":  # the probabilities are scored row by row, as attn@V reads them
            rows = bool(spec.option("lis_renormalize", True)) if point.group == "intSoft" else None
            self.log_search = LogBaseSearch(spec.bits, spec.signed, rows=rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            try:
                self.observer.update(x.detach())
                if self.log_search is not None:
                    self.log_search.update(x)
            except ValueError as exc:  # name the graph node, so the pass error can too
                raise NodeError(self.point_name.split(" ", 1)[0], str(exc)) from None
        return x * self.post_scale if self.post_scale != 1.0 else x

    def resolved_method(self, qparams: QParams) -> str:
        """The method the FakeQuantize gets: the spec's, or for ``log_adaptive`` the log base
        of least error on the calibration data (one scale per tensor only). The attention
        probabilities' point (``intSoft``) is searched on the grid from 1, the one the
        Log-Int-Softmax that replaces it counts from."""
        if self.log_search is None:
            return self.point.spec.method
        if qparams.per_channel:
            raise ValueError(
                f"{self.point.label}: log_adaptive chooses one base per tensor; use calibration_mode layer_wise"
            )
        scale = 1.0 if self.point.group == "intSoft" else float(qparams.scale)
        return method_for_step(self.log_search.best_step(scale))

    def extra_repr(self) -> str:
        return f"{self.point.label} {self.point.spec.describe()} post_scale={self.post_scale:g}"


@savable(
    Schema(
        {"point": POINT, "qparams": QPARAMS, "method": ("uniform", *RESOLVED_LOG_METHODS), "post_scale": NUMBER},
        {
            "scale": TensorRule((torch.float32,), ndims=(0, 1), required=True),
            "zero_point": TensorRule((torch.float32,), like="scale", required=True),
            "#qparams.scale": TensorRule((torch.float32,), like="scale", required=True),
            "#qparams.zero_point": TensorRule((torch.float32,), like="scale", required=True),
        },
        layout="config",
    )
)
class FakeQuantize(nn.Module):
    """Quantize-dequantize with frozen QParams, then the folded constant ``post_scale``.

    ``method`` is the spec's method, or the one calibration resolved it to (``log_adaptive``
    -> a log base such as ``log2^2/3``, see :meth:`ObserverModule.resolved_method`)."""

    def __init__(self, point: QuantPoint, qparams: QParams, post_scale: float = 1.0, method: Optional[str] = None):
        super().__init__()
        self.point = point
        self.qparams = qparams
        self.method = point.spec.method if method is None else method
        log_step(self.method)  # ValueError for log_adaptive (unresolved) and unknown names
        self.post_scale = post_scale
        self.register_buffer("scale", qparams.scale.clone())
        self.register_buffer("zero_point", qparams.zero_point.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fake_quantize(x, self.qparams, self.method)
        return y * self.post_scale if self.post_scale != 1.0 else y

    def extra_repr(self) -> str:
        scale = self.qparams.scale
        shown = f"{scale.item():.4g}" if scale.dim() == 0 else f"per-axis{self.qparams.axis}[{scale.numel()}]"
        return f"{self.point.label} {self.point.spec.describe()} scale={shown} post_scale={self.post_scale:g}"


def _codes_dtype(qparams: QParams) -> torch.dtype:
    return code_dtype_for(qparams.qmin, qparams.qmax) or torch.int32


class _QuantWeightMixin:
    """Holds the weight as integer codes plus QParams; the float weight is derived once."""

    weight_codes: torch.Tensor

    def _set_quantized_weight(self, weight: torch.Tensor, point: QuantPoint, qparams: QParams) -> None:
        codes = quantize(weight.detach(), qparams)
        self.point = point
        self.weight_qparams = qparams
        self.register_buffer("weight_codes", codes.to(_codes_dtype(qparams)))
        self.register_buffer("weight", dequantize(codes, qparams).to(weight.dtype))
        # the float weight it was quantized from (after smoothing): fxquant.debug swaps it in
        # to turn this point off; not persistent, so state_dicts are unchanged
        self.register_buffer("float_weight", weight.detach().clone(), persistent=False)


def _weight_tensors(codes: TensorRule, bias: TensorRule) -> dict[str, TensorRule]:
    """The tensors of a quantized-weight module: codes, the float weight they stand for, bias, QParams."""
    return {
        "weight_codes": codes,
        "weight": TensorRule((torch.float32,), like="weight_codes", required=True),
        "float_weight": TensorRule((torch.float32,), like="weight_codes"),
        "bias": bias,
        # the bias before bias_correction shifted it (not persistent, like float_weight)
        "float_bias": bias,
        "#weight_qparams.scale": TensorRule((torch.float32,), ndims=(0, 1), required=True),
        "#weight_qparams.zero_point": TensorRule((torch.float32,), like="#weight_qparams.scale", required=True),
    }


_WEIGHT_CODES = (torch.int8, torch.uint8, torch.int32)


@savable(
    Schema(
        {"point": POINT, "weight_qparams": QPARAMS, "in_features": int, "out_features": int},
        _weight_tensors(
            TensorRule(_WEIGHT_CODES, ndims=(2,), rows="out_features", cols="in_features", required=True),
            per_output(torch.float32),
        ),
        layout="config",
    )
)
class QuantLinear(_QuantWeightMixin, nn.Module):
    def __init__(self, linear: nn.Linear, point: QuantPoint, qparams: QParams):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._set_quantized_weight(linear.weight, point, qparams)
        self.bias: Optional[nn.Parameter] = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features} weight={self.point.spec.describe()}"


@savable(
    Schema(
        {"point": POINT, "weight_qparams": QPARAMS, "stride": list, "padding": list, "dilation": list, "groups": int},
        _weight_tensors(TensorRule(_WEIGHT_CODES, ndims=(4,), required=True), TensorRule((torch.float32,), ndims=(1,))),
        layout="config",
    )
)
class QuantConv2d(_QuantWeightMixin, nn.Module):
    def __init__(self, conv: nn.Conv2d, point: QuantPoint, qparams: QParams):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported; only 'zeros'")
        self._set_quantized_weight(conv.weight, point, qparams)
        self.bias: Optional[nn.Parameter] = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"weight={self.point.spec.describe()} stride={self.stride}"


QUANTIZED_WEIGHT_TYPES = (QuantLinear, QuantConv2d)


def weight_input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A quantized layer's input as (tokens, in) rows matching its weight matrix's columns
    (a convolution's input unfolded into patch columns)."""
    if isinstance(module, QuantConv2d):
        kernel = module.weight.shape[2:]
        cols = F.unfold(x, kernel, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


OBSERVER_PREFIX = "fxq_"  # the attribute prefix of the observer submodules insert_observers adds


def observer_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, ObserverModule]]:
    """The observer nodes insert_observers added, in graph order, with their modules."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            module = gm.get_submodule(str(node.target))
            if isinstance(module, ObserverModule):
                out.append((node, module))
    return out
