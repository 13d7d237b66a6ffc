"""nn.Modules of the integer graph (``backend="int"``), inserted by ``lower_integer``.

Between quantization points values travel as int8 codes (see ``fxquant.runtime.integer`` for the
layout). ``QuantizeCodes`` turns a float tensor into codes where the input comes from a
float op; ``DequantizeCodes`` is the explicit way back to float for a float consumer
(softmax, LayerNorm, GELU, residual adds). ``IntLinear`` and ``IntMatmul`` compute on codes
and give either float (dequantized with the exact input and weight scales) or, when their
result feeds a quantization point directly, that point's codes by dyadic requantization.

Every parameter is a buffer, shaped to broadcast against the tensor it applies to, so
``state_dict`` holds all of them and ``.to(device)`` moves them.

Codes hold no NaN or inf: ``QuantizeCodes`` clamps an inf to the end code and casts a NaN to
an arbitrary one. ``lower_to_integer`` therefore checks, per sample, every float tensor
computed from the inputs that becomes codes, and makes such a sample's outputs NaN, as in
FP32 (``fxquant.lowering.nonfinite``); the modules themselves stay as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fxquant.runtime.fast_codes import fast_dequantize, fast_quantize
from fxquant.runtime.int4_weights import WEIGHT_TENSORS, PackedWeight
from fxquant.runtime.integer import (
    UINT8_OFFSET,
    dequantize_codes,
    int8_linear,
    int8_matmul_with_sums,
    quantize_codes,
    requant_offset,
    requantize,
    shared_shift_multiplier,
    uint8_to_int8_codes,
)
from fxquant.runtime.savable import Schema, TensorRule, per_output, savable

_f32, _f64 = torch.float32, torch.float64
_SCALE = TensorRule((_f32,), required=True)
_ZERO_POINT = TensorRule((_f32,), fits="scale", required=True)
_NAMED = {"label": str, "out_label": str, "qmin": int, "qmax": int}


@savable(
    Schema({**_NAMED, "codes_dtype": ("int8", "uint8")}, {"scale": _SCALE, "zero_point": _ZERO_POINT}),
)
class QuantizeCodes(nn.Module):
    """float -> int8 codes of one quantization point (shifted codes, see fxquant.runtime.integer).
    A NaN or inf input gives some code; the graph's non-finite guard flags its sample."""

    codes_dtype = "int8"  # "uint8" after to_uint8()

    def __init__(self, label: str, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.label, self.qmin, self.qmax = label, qmin, qmax
        self.register_buffer("scale", scale.to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.to(torch.float32).clone())

    def to_uint8(self) -> None:
        """Emit ``int8 code + 128`` as uint8 (oneDNN's activation type); same values."""
        self.zero_point += UINT8_OFFSET
        self.qmin, self.qmax, self.codes_dtype = self.qmin + UINT8_OFFSET, self.qmax + UINT8_OFFSET, "uint8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.uint8 if self.codes_dtype == "uint8" else torch.int8
        fast = fast_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, dtype)  # one C++ pass, same codes
        return fast if fast is not None else quantize_codes(x, self.scale, self.zero_point, self.qmin, self.qmax, dtype)

    def extra_repr(self) -> str:
        return f"{self.label} -> {self.codes_dtype} codes [{self.qmin}, {self.qmax}]"


@savable(
    Schema(
        {"label": str, "post_scale": float, "fused_affine": bool},
        {
            "scale": _SCALE,
            "zero_point": _ZERO_POINT,
            "affine_scale": TensorRule((_f32,), fits="scale"),
            "affine_bias": TensorRule((_f32,), fits="scale"),
        },
    )
)
class DequantizeCodes(nn.Module):
    """int8 codes -> float: the explicit boundary before an op that stays in float."""

    fused_affine = False  # set by fuse_affine()

    def __init__(self, label: str, scale: torch.Tensor, zero_point: torch.Tensor, post_scale: float = 1.0):
        super().__init__()
        self.label, self.post_scale = label, post_scale
        self.register_buffer("scale", scale.to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.to(torch.float32).clone())

    def to_uint8(self) -> None:
        """Read ``int8 code + 128`` codes (see ``QuantizeCodes.to_uint8``)."""
        self.zero_point += UINT8_OFFSET
        if self.fused_affine:
            self.fuse_affine()

    def fuse_affine(self) -> None:
        """Dequantize as one multiply-add, ``codes * m + b``, instead of ``(codes - zp) * s``.

        The value may differ from the fake-quant graph's in the last float32 bit. Used where
        only a softmax reads the value (attention scores): inductor then keeps the scores in
        one pass instead of writing a second, sign-adjusted float copy of the (B, H, N, N)
        tensor for the softmax's maximum (ViT-B batch 8 under torch.compile: about 5 % of the
        whole forward)."""
        total = self.scale * self.post_scale
        self.register_buffer("affine_scale", total.clone())
        self.register_buffer("affine_bias", (-self.zero_point * total).clone())
        self.fused_affine = True

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.fused_affine:
            return torch.addcmul(self.affine_bias, codes.to(torch.float32), self.affine_scale)
        fast = fast_dequantize(codes, self.scale, self.zero_point, self.post_scale)  # one C++ pass, same values
        return fast if fast is not None else dequantize_codes(codes, self.scale, self.zero_point, self.post_scale)

    def extra_repr(self) -> str:
        fused = ", one multiply-add" if self.fused_affine else ""
        return f"{self.label} codes -> float" + (f" x {self.post_scale:g}" if self.post_scale != 1.0 else "") + fused


class _Requantizing(nn.Module):
    """Shared output handling: float (times ``out_scale``) or a point's codes (dyadic)."""

    def _set_float_output(self, scale: torch.Tensor) -> None:
        self.requantizes = False
        self.register_buffer("out_scale", scale.to(torch.float32).contiguous())
        self.register_buffer("out_point_scale", None)  # set with a codes output
        self.register_buffer("out_point_zero", None)

    def _set_codes_output(
        self,
        multiplier: torch.Tensor,
        correction: torch.Tensor,
        out_scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        label: str,
    ) -> None:
        """``multiplier``: the real requantization factor, broadcast against the output;
        ``correction``: an integer added to the accumulator before requantizing (bias and
        zero-point terms). Both, the rounding and the zero point become one int64 offset.
        The point's own scale and zero point are kept too (float64), for kernels that
        requantize in float (``fxquant.runtime.onednn``)."""
        m, k = shared_shift_multiplier(multiplier)
        self.requantizes, self.out_label, self.qmin, self.qmax = True, label, qmin, qmax
        self.register_buffer("out_multiplier", m.to(torch.int32))  # the int64 offset promotes the product
        self.register_buffer("out_shift", k)
        self.register_buffer("out_offset", requant_offset(m, k, correction, zero_point.to(torch.int64)))
        self.register_buffer("out_point_scale", out_scale.to(torch.float64).clone())
        self.register_buffer("out_point_zero", zero_point.to(torch.float64).clone())
        self.out_scale = None

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.requantizes:
            return requantize(acc, self.out_multiplier, self.out_shift, self.out_offset, self.qmin, self.qmax)
        return acc.to(torch.float32).mul_(self.out_scale)


@savable(
    Schema(
        {
            **_NAMED,
            "in_features": int,
            "out_features": int,
            "input_scale": float,
            "input_zero_point": int,
            "requantizes": bool,
            "float_requant": bool,
            "bias": None,
            "weight_scale": None,
            "zero_point_term": None,
            "out_point_scale": None,
            "out_point_zero": None,
        },
        {
            **WEIGHT_TENSORS,
            "out_multiplier": per_output(torch.int32),
            "out_shift": TensorRule((torch.int64,), ndims=(0,)),
            "out_offset": per_output(torch.int64),
            "out_scale": per_output(_f32),
            "out_bias": per_output(_f32),
            # the setup tensors, kept until the pipeline's end releases them
            "bias": per_output(_f32),
            "weight_scale": per_output(_f32),
            "zero_point_term": per_output(torch.int32),
            "out_point_scale": TensorRule((_f64,), ndims=(0, 1)),
            "out_point_zero": TensorRule((_f64,), fits="out_point_scale"),
        },
        exactly_one=("weight_codes", "weight_packed"),
    )
)
class IntLinear(PackedWeight, _Requantizing):
    """A Linear on int8 codes: ``torch._int_mm`` (int8 x int8 -> int32), zero-point term
    precomputed, then float output or the next point's codes.

    ``weight_codes`` is the (out, in) int8 weight, stored contiguous once so that its
    transpose is the layout the int8 GEMM reads fastest; no float weight is kept. A 4-bit
    weight may be packed instead (``weight_packed``, ``fxquant.runtime.int4_weights``).
    """

    def __init__(
        self,
        weight_codes: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        input_scale: float,
        input_zero_point: int,
        label: str = "",
    ):
        super().__init__()
        if weight_codes.dtype != torch.int8 or weight_codes.dim() != 2:
            raise ValueError("IntLinear needs a 2-d int8 weight")
        self.label = label
        self.out_features, self.in_features = weight_codes.shape
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.register_buffer("weight_codes", weight_codes.contiguous())
        self.register_buffer("weight_packed", None)  # pack_weight() moves a 4-bit weight here
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).expand(self.out_features).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        # sum_k (x_k - z) w_nk = acc_n - z * sum_k w_nk: the second term is a constant per row
        row_sums = weight_codes.to(torch.int64).sum(dim=1)
        self.register_buffer("zero_point_term", (self.input_zero_point * row_sums).to(torch.int32))
        self.set_float_output()

    @property
    def accumulator_scale(self) -> torch.Tensor:
        """s_x * s_w per output feature (float64): the real value of one accumulator unit."""
        if self.weight_scale is None:
            raise RuntimeError("release_setup_tensors() was called: the scales are folded away")
        return self.input_scale * self.weight_scale.to(torch.float64)

    def set_float_output(self) -> None:
        """y = acc * s_x s_w + (bias - z_x sum_k w_nk * s_x s_w): the zero-point term folded
        into the float bias (computed in float64), so the epilogue is one multiply-add."""
        acc_scale = self.accumulator_scale
        bias = torch.zeros_like(acc_scale) if self.bias is None else self.bias.to(torch.float64)
        self._set_float_output(acc_scale)
        self.register_buffer("out_bias", (bias - self.zero_point_term.to(torch.float64) * acc_scale).float())

    def set_codes_output(
        self, out_scale: torch.Tensor, out_zero_point: torch.Tensor, qmin: int, qmax: int, label: str
    ) -> None:
        """Requantize straight to a point's codes (per output feature scale/zero point)."""
        acc_scale = self.accumulator_scale
        bias = torch.zeros_like(acc_scale) if self.bias is None else self.bias.to(torch.float64)
        bias_units = torch.round(bias / acc_scale).to(torch.int64)  # int32 bias at scale s_x * s_w
        correction = bias_units - self.zero_point_term.to(torch.int64)
        self._set_codes_output(
            acc_scale / out_scale.to(torch.float64), correction, out_scale, out_zero_point, qmin, qmax, label
        )
        self.out_bias = None

    def release_setup_tensors(self) -> None:
        """Drop bias, weight scales and the zero-point term once they are folded into the
        output constants: at run time the layer holds its int8 weight and 8-16 bytes per
        output feature. ``set_codes_output`` cannot be called afterwards."""
        for name in ("bias", "weight_scale", "zero_point_term", "out_point_scale", "out_point_zero"):
            delattr(self, name)
            setattr(self, name, None)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        acc = int8_linear(codes, self.int8_weight().t())
        if self.requantizes:
            return self._finish(acc)
        # one pass: the int32 accumulator is promoted inside addcmul (no float copy of it)
        return torch.addcmul(self.out_bias, acc, self.out_scale)

    def extra_repr(self) -> str:
        out = f"codes of {self.out_label}" if self.requantizes else "float"
        weight = "int4 (packed)" if self.packed else "int8"
        return f"{self.in_features}->{self.out_features} int8 x {weight} -> int32 -> {out}"


def _like_a(dtype: torch.dtype) -> TensorRule:
    return TensorRule((dtype,), fits="a_zero_point")


@savable(
    Schema(
        {**_NAMED, "requantizes": bool, "a_uint8": bool, "b_uint8": bool, "float_requant": bool},
        {
            "a_zero_point": TensorRule((_f32,), required=True),
            "b_zero_point": TensorRule((_f32,), fits="a_zero_point", required=True),
            "acc_scale": TensorRule((_f64,), fits="a_zero_point", required=True),
            "out_point_scale": _like_a(_f64),
            "out_point_zero": _like_a(_f64),
            "out_multiplier": _like_a(torch.int32),
            "out_shift": TensorRule((torch.int64,), ndims=(0,)),
            "out_offset": _like_a(torch.int64),
            "out_scale": _like_a(_f32),
            "float_multiplier": _like_a(_f32),
            "float_zero_point": _like_a(_f32),
        },
    )
)
class IntMatmul(_Requantizing):
    """``a @ b`` of two code tensors (attention's q @ kT, probs @ v), exact.

    On CPU: int8 x int8 -> int32 by ``torch._int_mm`` per (batch, head) matrix, then the
    zero-point terms ``(a - za)(b - zb) = ab - za colsum(b) - zb rowsum(a) + K za zb`` as two
    in-place int32 adds (6x faster than a float matmul at ViT-B sizes). The GEMMs and the sums
    are one function (``int8_matmul_with_sums``), an opaque op under torch.compile
    (``fxquant::int8_bmm_sums``), so that inductor neither unrolls the per-matrix loop nor
    recomputes the sums per element, and the zero-point terms fuse into the requantization.
    On CUDA: the zero points are subtracted in float32 and one batched float32 matmul runs;
    the operands are integers below 256 in magnitude and the lowering checks that every
    partial sum stays below 2**24 (``exact_float_matmul_bound``), so it gives the same exact
    accumulator.
    """

    def __init__(
        self, a_zero_point: torch.Tensor, b_zero_point: torch.Tensor, acc_scale: torch.Tensor, label: str = ""
    ):
        super().__init__()
        self.label = label
        self.register_buffer("a_zero_point", a_zero_point.to(torch.float32).clone())
        self.register_buffer("b_zero_point", b_zero_point.to(torch.float32).clone())
        self.register_buffer("acc_scale", acc_scale.to(torch.float64).clone())
        self._set_float_output(self.acc_scale)

    def set_codes_output(
        self, out_scale: torch.Tensor, out_zero_point: torch.Tensor, qmin: int, qmax: int, label: str
    ) -> None:
        self._set_codes_output(
            self.acc_scale / out_scale.to(torch.float64),
            torch.zeros((), dtype=torch.int64),
            out_scale,
            out_zero_point,
            qmin,
            qmax,
            label,
        )

    float_requant = False  # set by use_float_requantization()

    def use_float_requantization(self) -> None:
        """Requantize as ``clamp(round(acc * M) + z)`` with ``M = s_a s_b / s_out`` in float32
        (the scale arithmetic of oneDNN's kernels) instead of the dyadic integer multiplier:
        under torch.compile it fuses into the softmax's kernel as a few float ops where the
        int64 multiply-shift costs more (ViT-B attention: about 12 % of the scores path).
        A code may differ by one where ``acc * M`` lies within float32 rounding of a step
        boundary; exact integer accumulators and zero points are unchanged."""
        if not self.requantizes:
            raise ValueError(f"{self.label}: float requantization needs a codes output (set_codes_output)")
        self.register_buffer("float_multiplier", (self.acc_scale / self.out_point_scale).float())
        self.register_buffer("float_zero_point", self.out_point_zero.float())
        self.float_requant = True

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        if self.float_requant:
            y = torch.round(acc.to(torch.float32) * self.float_multiplier).add_(self.float_zero_point)
            return y.clamp_(self.qmin, self.qmax).to(torch.int8)
        return super()._finish(acc)

    a_uint8 = b_uint8 = False  # an operand read as uint8 codes (int8 code + 128): oneDNN graphs

    def input_to_uint8(self, index: int) -> None:
        """Operand ``index`` (0: a, 1: b) arrives as uint8 codes (``fxquant.runtime.onednn``)."""
        if index == 0:
            self.a_uint8 = True
        else:
            self.b_uint8 = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_cuda or a.shape[:-2] != b.shape[:-2]:
            left = a.to(torch.float32).sub_(self.a_zero_point + (UINT8_OFFSET if self.a_uint8 else 0))
            right = b.to(torch.float32).sub_(self.b_zero_point + (UINT8_OFFSET if self.b_uint8 else 0))
            return self._finish(torch.matmul(left, right))
        if self.a_uint8:
            a = uint8_to_int8_codes(a)
        if self.b_uint8:
            b = uint8_to_int8_codes(b)
        za, zb = self.a_zero_point.to(torch.int32), self.b_zero_point.to(torch.int32)
        # compiled: one opaque op, and the zero-point terms fuse into the requantization
        with_sums = torch.ops.fxquant.int8_bmm_sums if torch.compiler.is_compiling() else int8_matmul_with_sums
        acc, row_sums, col_sums = with_sums(a, b)  # sums: (..., N, 1), (..., 1, M)
        return self._finish(acc.sub_(zb * row_sums).sub_(za * col_sums - a.shape[-1] * za * zb))

    def extra_repr(self) -> str:
        out = f"codes of {self.out_label}" if self.requantizes else "float"
        return f"{self.label} exact integer matmul -> {out}"
