"""oneDNN int8 Linear kernels for the integer graph (``compile(..., int_kernels="onednn")``).

The portable integer graph runs each Linear as ``torch._int_mm`` (int8 x int8 -> int32)
followed by a separate requantization (dyadic multiplier, see ``fxquant.runtime.integer``). On
x86 CPUs, oneDNN's int8 inner product (``torch.ops.onednn.qlinear_pointwise``, the kernel
that torchao's PT2E X86 recipe lowers to) applies the scales, the bias, an optional GELU and
the output quantization inside the GEMM's epilogue, so the int32 accumulator never goes
out to memory. ``OnednnLinear`` is that kernel for one lowered Linear.

Arithmetic, as oneDNN does it: ``y = acc * (s_x * w_scale[n]) + bias[n]`` in float32,
then GELU (erf) when fused, then ``round(y / s_out) + z_out`` saturated to the output
type. A per-feature output scale and zero point (Q/K/V's head-wise points) are folded into
``w_scale`` and ``bias`` (``s_out = 1``, ``z_out = 0``). The result can differ from the
fake-quant graph by one code where a value lies within float32 rounding of a step
boundary, like the portable kernels; ``use_onednn_kernels`` measures it.

A 4-bit weight may be stored packed, two codes per byte (``weight_packed``,
``fxquant.runtime.int4_weights``); it is unpacked and prepacked on each call, so only the
packed bytes stay in memory (under torch.compile with freezing both fold into a constant).

Input codes are **uint8** (oneDNN's fast path is unsigned activations x signed weights;
int8 activations take a far slower reference path): ``u8 = int8 code + 128``, zero point
likewise. Weights stay plain int8 tensors (buffers, saved with the graph); the packed
oneDNN layout is derived from them, cached for eager calls and, under ``torch.compile``,
computed in the graph, where inductor's freezing (``torch._inductor.config.freezing``,
inference under ``torch.no_grad()``) folds it into a constant. Without freezing, or on a
machine without oneDNN, the same arithmetic runs on ``torch._int_mm``.
"""

from __future__ import annotations

import platform
import sys
from typing import Optional

import torch
from torch import nn

from fxquant.runtime.int4_weights import WEIGHT_TENSORS, PackedWeight
from fxquant.runtime.integer import CODE_RANGES, UINT8_OFFSET, fits_uint8, int8_linear, uint8_to_int8_codes
from fxquant.runtime.savable import Schema, per_output, savable

__all__ = ["onednn_available", "OnednnLinear", "OUTPUT_DTYPES"]

OUTPUT_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32}
_RANGES = {name: CODE_RANGES[OUTPUT_DTYPES[name]] for name in ("uint8", "int8")}


def _probe_onednn() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = getattr(torch.ops, "onednn", None)
    try:
        return ops is not None and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _probe_onednn()  # once: forward must not call into platform/op lookups under dynamo


def onednn_available() -> bool:
    """True on an x86 CPU build of torch with oneDNN's int8 Linear ops."""
    return _AVAILABLE


def _inductor_freezes() -> bool:
    """Whether the graph being compiled has its buffers folded to constants (what oneDNN's
    packed weight needs under inductor). Inductor's config is read only if inductor is loaded,
    as it is whenever a graph is being compiled: importing it here would add about 1.5 s to
    ``import fxquant``."""
    config = sys.modules.get("torch._inductor.config")
    return config is not None and bool(config.freezing) and not torch.is_grad_enabled()


@savable(
    Schema(
        {
            "label": str,
            "out_label": str,
            "in_features": int,
            "out_features": int,
            "input_scale": float,
            "input_zero_point": int,
            "output": ("float32", "int8", "uint8"),
            "output_scale": float,
            "output_zero_point": int,
            "post_op": ("none", "gelu"),
        },
        {
            **WEIGHT_TENSORS,
            "weight_scale": per_output(torch.float32),
            "weight_zero_point": per_output(torch.int64),
            "bias": per_output(torch.float32),
        },
        exactly_one=("weight_codes", "weight_packed"),
    )
)
class OnednnLinear(PackedWeight, nn.Module):
    """A lowered Linear on uint8 codes with oneDNN's fused epilogue.

    ``output`` is ``"float32"`` (dequantized value), ``"uint8"`` or ``"int8"`` (codes of the
    next point). ``post_op`` is ``"none"`` or ``"gelu"`` (exact, erf).
    """

    def __init__(
        self,
        weight_codes: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        input_scale: float,
        input_zero_point: int,
        output: str = "float32",
        output_scale: float = 1.0,
        output_zero_point: int = 0,
        post_op: str = "none",
        label: str = "",
        out_label: str = "",
    ):
        super().__init__()
        if weight_codes.dtype != torch.int8 or weight_codes.dim() != 2:
            raise ValueError("OnednnLinear needs a 2-d int8 weight")
        if output not in OUTPUT_DTYPES:
            raise ValueError(f"output must be one of {sorted(OUTPUT_DTYPES)}, got {output!r}")
        if post_op not in ("none", "gelu"):
            raise ValueError(f"post_op must be 'none' or 'gelu', got {post_op!r}")
        if output == "float32" and (float(output_scale) != 1.0 or int(output_zero_point) != 0):
            raise ValueError("a float output has no output scale or zero point (oneDNN needs 1.0 and 0)")
        if not fits_uint8(int(input_zero_point), int(input_zero_point)):
            raise ValueError(f"uint8 input zero point {input_zero_point} is outside 0..255")
        self.label, self.out_label = label, out_label
        self.out_features, self.in_features = weight_codes.shape
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.output, self.output_scale, self.output_zero_point = output, float(output_scale), int(output_zero_point)
        self.post_op = post_op
        self.register_buffer("weight_codes", weight_codes.contiguous())
        self.register_buffer("weight_packed", None)  # pack_weight() moves a 4-bit weight here
        self.register_buffer(
            "weight_scale", weight_scale.detach().to(torch.float32).reshape(-1).expand(self.out_features).clone()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.int64))

    def __getstate__(self):  # the packed oneDNN copy is derived, and an opaque tensor deepcopy cannot copy
        state = self.__dict__.copy()
        state.pop("_packed_cache", None)
        return state

    # -- kernels
    def _packed(self) -> torch.Tensor:
        if self.packed:  # a 4-bit weight: unpacked and prepacked per call, only its packed bytes stay
            return torch.ops.onednn.qlinear_prepack(self.int8_weight(), None)
        cache = getattr(self, "_packed_cache", None)
        if cache is not None and cache[0] is self.weight_codes and cache[1] == self.weight_codes._version:
            return cache[2]
        packed = torch.ops.onednn.qlinear_prepack(self.weight_codes, None)
        self._packed_cache = (self.weight_codes, self.weight_codes._version, packed)
        return packed

    def _onednn(self, rows: torch.Tensor, packed: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        operands = (rows, self.input_scale, self.input_zero_point, packed, self.weight_scale, self.weight_zero_point)
        if residual is not None:  # float32 (M, N): added in the epilogue, after bias and scales
            return torch.ops.onednn.qlinear_pointwise.binary(
                *operands, residual, self.bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], ""
            )
        return torch.ops.onednn.qlinear_pointwise(
            *operands,
            self.bias,
            self.output_scale,
            self.output_zero_point,
            OUTPUT_DTYPES[self.output],
            self.post_op,
            [],
            "none",
        )

    def _portable(self, rows: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same arithmetic on ``torch._int_mm`` (no oneDNN, or compiled without freezing)."""
        weight = self.int8_weight()
        acc = int8_linear(uint8_to_int8_codes(rows), weight.t())
        row_sums = weight.sum(dim=1, dtype=torch.int32)
        acc = acc - (self.input_zero_point - UINT8_OFFSET) * row_sums
        y = acc.to(torch.float32) * (self.input_scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        if self.post_op == "gelu":
            y = torch.nn.functional.gelu(y)
        if self.output == "float32":
            return y if residual is None else y + residual
        low, high = _RANGES[self.output]
        q = torch.round(y / self.output_scale) + self.output_zero_point
        return q.clamp_(low, high).to(OUTPUT_DTYPES[self.output])

    def forward(self, codes: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual`` (``fuse_residual_adds``): a float tensor added to the float output,
        ``linear(codes) + residual``, in the GEMM's epilogue when it has the output's shape and
        float32 dtype (bit-identical to the separate add: one float32 addition either way),
        else as a separate add with torch's broadcasting."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"{self.label or 'OnednnLinear'}: expected uint8 codes, got {codes.dtype}")
        lead = codes.shape[:-1]
        rows = codes.reshape(-1, self.in_features)
        res_rows = None
        if residual is not None:
            if self.output != "float32" or self.post_op != "none":
                raise TypeError(f"{self.label or 'OnednnLinear'}: a residual needs a float output without GELU")
            if residual.shape != (*lead, self.out_features) or residual.dtype != torch.float32:
                return self.forward(codes) + residual
            res_rows = residual.reshape(-1, self.out_features).contiguous()
        if codes.device.type != "cpu" or not _AVAILABLE:
            out = self._portable(rows, res_rows)
        elif torch.compiler.is_compiling():
            # inside the compiled graph the packing is an op on a buffer: freezing folds it
            out = (
                self._onednn(rows.contiguous(), torch.ops.onednn.qlinear_prepack(self.int8_weight(), None), res_rows)
                if _inductor_freezes()
                else self._portable(rows, res_rows)
            )
        else:
            out = self._onednn(rows.contiguous(), self._packed(), res_rows)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        out = "float" if self.output == "float32" else f"{self.output} codes of {self.out_label}"
        gelu = " -> GELU" if self.post_op == "gelu" else ""
        return f"{self.in_features}->{self.out_features} oneDNN u8 x s8{gelu} -> {out}"
