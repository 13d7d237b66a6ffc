"""Log-Int-Softmax (LIS, FQ-ViT): softmax from integer scores, log2-quantized probabilities.

Given the attention scores as integer codes ``x_int`` on a (per-tensor or per-head) scale
``s`` — FQ-ViT passes the scores quantizer's scale even when a relative-position bias or
a mask was added after it, and so do we: the sum is put back on that grid by rounding —

1. ``x_int -= max(x_int)`` per row, so every exponent is <= 0;
2. the integer scores are shifted left until their grid is at most 2**-8 (exact; see
   ``refine_shift``), then ``exp`` by I-BERT's integer polynomial: ``x = -ln2 * q + r`` with ``r`` in (-ln2, 0],
   ``exp(r) ~ 0.35815147 * (r + 1.353)**2 + 0.344`` evaluated on integers, then shifted
   right by ``q``; all on the integer grid of ``s`` (``i_exp``);
3. the probability ``e_i / sum(e)`` is never formed: its log2 code ``m_i`` is found by
   integer comparisons of ``e_i`` and ``sum(e)`` (``nearest_power_code``: the power of two
   nearest to the probability in the linear domain), so the value is ``2**-m_i`` and
   attn@V becomes shifts of V.

Renormalization (``lis_renormalize``, default on): rounding every probability to a power of
two does not keep a row's sum at 1 (a near-uniform row over 197 tokens sums to 0.77), which
scales attn@V by the same error. LogIntSoftmax divides each row by the sum of its
quantized values; in integer arithmetic that is one per-row factor folded into attn@V's
requantization (the sum of ``2**(qmax-m)`` is an integer). On DINOv2 ViT-S/14 it is worth
2-4 dB of feature QSNR. ``lis_renormalize: false`` gives FQ-ViT's LIS exactly.

Codes follow fxquant's log2 layout (``fxquant.quant.quantizers``): unsigned, ``m`` in 0..qmax with
``qmax = 2**bits - 1`` meaning exactly 0 (FQ-ViT masks ``m >= 2**bits`` to 0 instead; the
difference is the single value ``2**-qmax``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fxquant.runtime.int_attention import kernel_ready, load_kernel
from fxquant.runtime.integer import UINT8_OFFSET
from fxquant.runtime.savable import POINT, Schema, TensorRule, savable

__all__ = [
    "i_exp",
    "nearest_power_code",
    "refine_shift",
    "lis_codes",
    "lis_values",
    "lis_shift_reference",
    "lis_kernel_constants",
    "LogIntSoftmax",
    "LisShiftMatmul",
]

_COEF = (0.35815147, 0.96963238, 1.0)  # I-BERT's second-order fit of exp on (-ln2, 0]
_LN2 = 0.6931
_EXP_SHIFT = 30  # exponents below -30*ln2 underflow to 0


def i_exp(x_int: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I-BERT's integer exp of ``x_int * scale`` (x_int <= 0): (integer values, their scale).

    Everything is integer-valued (float64 holding integers: exact below 2**53) except the
    constants folded from ``scale``, which an integer kernel would precompute.
    """
    x_int = x_int.double()
    scale = scale.double()
    x0_int = torch.floor(-_LN2 / scale)
    x_int = torch.maximum(x_int, _EXP_SHIFT * x0_int)
    q = torch.floor(x_int / x0_int)
    r = x_int - x0_int * q
    b_int = torch.floor(_COEF[1] / _COEF[0] / scale)
    c_int = torch.floor(_COEF[2] / _COEF[0] / scale**2)
    poly = r * (r + b_int) + c_int
    exp_int = torch.clamp(torch.floor(poly * torch.pow(2.0, _EXP_SHIFT - q)), min=0)
    return exp_int, _COEF[0] * scale**2 / 2**_EXP_SHIFT


def nearest_power_code(total: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``m = round(log2(total / e))``: the log2 code of the probability ``e / total``.

    Integer comparisons only (on integer-valued float64, ``0 < e <= total``): ``k`` with
    ``2**k * e <= total < 2**(k+1) * e``, then ``k + 1`` when ``total / e >= sqrt(2) * 2**k``,
    i.e. ``total**2 >= 2**(2k+1) * e**2``. This is the rounding of fxquant's log2 quantizer
    (in the log domain). FQ-ViT instead rounds ``total / e`` to an integer and then to the
    nearest power in the ratio's linear domain; on DINOv2 ViT-S/14 that costs 2.5 dB of
    feature QSNR (probabilities above 2/3, attention sinks, come out as 1.0).
    """
    k = torch.floor(torch.log2(total / e))
    k = torch.where(torch.pow(2.0, k) * e > total, k - 1, k)  # fix float rounding of log2
    k = torch.where(torch.pow(2.0, k + 1) * e <= total, k + 1, k)
    # round in the log domain: up when total / e >= sqrt(2) * 2**k, compared squared
    return torch.where(total * total >= torch.pow(2.0, 2 * k + 1) * e * e, k + 1, k)


_FINE_SCALE = 2.0**-8  # the integer exp's grid: ln2 spans >= 177 steps (< 0.2% error per octave)


def refine_shift(scale: torch.Tensor) -> torch.Tensor:
    """Left shift that puts scores on a grid no coarser than ``_FINE_SCALE``.

    An 8-bit scores grid on a real ViT is coarse (DINOv2: steps of 0.1-0.4): the integer exp's
    ``floor(-ln2 / s)`` then misplaces every octave by up to 40%. Shifting the integer scores
    left by k bits (exact) and running the integer exp on the grid ``s / 2**k`` keeps the
    arithmetic integer and makes it accurate. Per head when the scale is per head.
    """
    return torch.clamp(torch.ceil(torch.log2(scale.double() / _FINE_SCALE)), min=0)


def lis_codes(scores: torch.Tensor, scale: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Log2 probability codes (float tensor of integers) of softmax(scores) along ``dim``.

    ``scale`` broadcasts against ``scores`` (0-d, or shaped like a per-head scale).
    """
    qmax = 2**bits - 1
    x_int = torch.round(scores.double() / scale.double())
    x_int = x_int - x_int.amax(dim=dim, keepdim=True)
    shift = refine_shift(scale)
    exp_int, _ = i_exp(x_int * 2.0**shift, scale.double() / 2.0**shift)
    total = exp_int.sum(dim=dim, keepdim=True)
    m = nearest_power_code(total, exp_int.clamp_min(1))
    m = torch.where(exp_int > 0, m, torch.full_like(m, qmax))
    return m.clamp_(0, qmax)


def lis_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2**bits - 1
    values = torch.pow(2.0, -codes)
    return values.masked_fill_(codes >= qmax, 0.0)


@savable(
    Schema(
        {"point": POINT, "bits": int, "dim": int, "renormalize": bool},
        {"scale": TensorRule((torch.float32,))},
        layout="config",
    )
)
class LogIntSoftmax(nn.Module):
    """Replaces ``softmax(x, dim)`` and the log2 point after it (see the module docstring).

    ``scale`` is the scores point's scale, shaped to broadcast (0-d, or (1, H, 1, 1) for
    per-head scales).
    """

    def __init__(self, scale: torch.Tensor, bits: int, dim: int = -1, point=None, renormalize: bool = True):
        super().__init__()
        if bits < 2 or bits > 16:
            raise ValueError(f"LIS needs 2..16 bits, got {bits}")
        self.bits, self.dim, self.point, self.renormalize = bits, dim, point, bool(renormalize)
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = lis_values(lis_codes(x, self.scale, self.bits, self.dim), self.bits)
        if self.renormalize:  # one factor per row: the powers of two of a row sum to 1 again
            values = values / values.sum(self.dim, keepdim=True)
        return values.to(x.dtype)

    def extra_repr(self) -> str:
        shown = f"{self.scale.item():.4g}" if self.scale.numel() == 1 else f"per-head[{self.scale.numel()}]"
        return f"log2 {self.bits}-bit probabilities, integer exp, scores scale={shown}"


def lis_shift_reference(
    scores: torch.Tensor,
    v_codes: torch.Tensor,
    lis_scale: torch.Tensor,
    bits: int,
    renormalize: bool,
    v_scale: torch.Tensor,
    v_zero_point: torch.Tensor,
    max_shift: int,
) -> torch.Tensor:
    """``LisShiftMatmul``'s arithmetic in torch (``v_zero_point`` in the domain of ``v_codes``)."""
    m = lis_codes(scores, lis_scale, bits, -1)
    qmax = 2**bits - 1
    powers = torch.where((m <= max_shift) & (m < qmax), torch.pow(2.0, max_shift - m), torch.zeros_like(m))
    acc = torch.matmul(powers, v_codes.to(torch.float64) - v_zero_point)
    if renormalize:
        out = acc * v_scale / powers.sum(-1, keepdim=True)
    else:
        out = acc * (v_scale * 2.0**-max_shift)
    return out.to(scores.dtype)


_MAX_TABLE = 1 << 20  # exp table entries per head (score grids finer than ~2e-5 keep the torch path)


def _per_head(value: torch.Tensor, heads: int, columns: int) -> Optional[torch.Tensor]:
    """``value`` (broadcastable against (B, H, rows, columns)) as float64 (H, columns), or None
    when it varies along the batch or the rows."""
    shape = (1,) * (4 - value.dim()) + tuple(value.shape) if value.dim() <= 4 else None
    if shape is None or shape[0] != 1 or shape[2] != 1 or shape[1] not in (1, heads) or shape[3] not in (1, columns):
        return None
    return value.double().reshape(shape[1], shape[3]).expand(heads, columns).contiguous()


def lis_kernel_constants(
    lis_scale: torch.Tensor, bits: int, v_scale: torch.Tensor, v_zero_point: torch.Tensor, heads: int, vdim: int
) -> Optional[tuple]:
    """(grid, exp table, V scale, V zero point) for ``fxquant_kernels::lis_shift_matmul``: per head
    the scores' grid (float64), the reference's ``i_exp`` of ``-d`` for every gap ``d`` to the
    row's largest score up to where i_exp clamps (``_EXP_SHIFT`` octaves), and V's constants
    as (H, Dv). None when the constants do not take that form (scales varying along the batch or
    the tokens, a fractional zero point, a table too long or with values above 2**53)."""
    grid = _per_head(lis_scale, heads, 1)
    vs, vz = _per_head(v_scale, heads, vdim), _per_head(v_zero_point, heads, vdim)
    if grid is None or vs is None or vz is None or not bool(torch.all(vz == vz.round())):
        return None
    grid = grid.reshape(heads)
    shift = refine_shift(grid)
    fine = grid / 2.0**shift
    x0 = torch.floor(-_LN2 / fine)  # i_exp's x0_int: it clamps at 30 * x0 on the fine grid
    last = torch.ceil(_EXP_SHIFT * -x0 / 2.0**shift)  # the first gap d where the clamp applies
    if not bool(torch.all(torch.isfinite(last))) or float(last.max()) >= _MAX_TABLE:
        return None
    gaps = torch.arange(int(last.max()) + 1, dtype=torch.float64)
    table, _ = i_exp(-gaps[None, :] * 2.0 ** shift[:, None], fine[:, None])
    if float(table.max()) >= 2.0**53:  # exact in float64 (the kernel checks its int64 row totals)
        return None
    return grid.contiguous(), table.contiguous(), vs, vz


@savable(
    Schema(
        {"bits": int, "renormalize": bool, "max_shift": int, "label": str, "v_uint8": bool},
        {
            "lis_scale": TensorRule((torch.float32,), required=True),
            "v_scale": TensorRule((torch.float64,), fits="lis_scale", required=True),
            "v_zero_point": TensorRule((torch.float64,), fits="lis_scale", required=True),
        },
    )
)
class LisShiftMatmul(nn.Module):
    """Log-Int-Softmax and attn@V as shifts: ``softmax(scores) @ v`` where the probabilities
    are FQ-ViT's log2 codes ``m`` (value ``2**-m``) and ``v`` is a point's int8 codes.

    The log2 codes come from the scores by ``fxquant.runtime.log_int_softmax`` (integer exp, integer
    comparisons: what the fake-quant graph's LogIntSoftmax computes). Then
    ``acc_i = sum_j (v_j - zv) << (T - m_ij)``: a shift and an add per term, computed as one
    float64 matmul of the powers of two ``2**(T - m)`` with the integer codes, which is exact
    (``T`` is chosen so that every partial sum stays below 2**53; terms below ``2**-T`` of
    the largest are dropped, far below float32's rounding of the fake-quant graph). With
    ``renormalize`` each row is divided by its integer sum of powers of two; the result is
    ``acc_i * s_v / R_i`` in float (the attn@V point after it quantizes it).
    """

    def __init__(
        self,
        lis_scale: torch.Tensor,
        bits: int,
        renormalize: bool,
        v_scale: torch.Tensor,
        v_zero_point: torch.Tensor,
        max_shift: int,
        label: str = "",
    ):
        super().__init__()
        self.bits, self.renormalize, self.max_shift, self.label = int(bits), bool(renormalize), int(max_shift), label
        self.register_buffer("lis_scale", lis_scale.to(torch.float32).clone())
        self.register_buffer("v_scale", v_scale.to(torch.float64).clone())
        self.register_buffer("v_zero_point", v_zero_point.to(torch.float64).clone())

    v_uint8 = False  # V read as uint8 codes (int8 code + 128): oneDNN graphs
    _kernel_args = None  # (grid, exp table, V scale, V zero point) of the C++ kernel, built on first use

    def input_to_uint8(self, index: int) -> None:
        """Operand ``index`` arrives as uint8 codes; only V (1) holds codes."""
        if index != 1:
            raise ValueError("LisShiftMatmul reads codes only as its second operand (V)")
        self.v_uint8 = True

    def forward(self, scores: torch.Tensor, v_codes: torch.Tensor) -> torch.Tensor:
        if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 4 and v_codes.dim() == 4:
            key = (scores.shape[1], v_codes.shape[-1], self.v_uint8)
            cached = self._kernel_args
            args = cached[1] if cached is not None and cached[0] == key else self.kernel_args(key)
            if args is not None and kernel_ready():
                batch, heads = scores.shape[:2]  # V shared across batch or heads: stride-0 views, no copy
                return torch.ops.fxquant_kernels.lis_shift_matmul(
                    scores,
                    v_codes.expand(batch, heads, -1, -1),
                    *args,
                    self.bits,
                    self.max_shift,
                    self.renormalize,
                )
        return self.reference(scores, v_codes)

    @torch.compiler.disable
    def kernel_args(self, key: tuple) -> Optional[tuple]:
        """The C++ kernel's per-head constants for (heads, Dv, v_uint8), built once and kept
        (None: no kernel here, or constants it cannot take; ``reference`` runs instead)."""
        heads, vdim, v_uint8 = key
        args = None
        if load_kernel():
            v_zero_point = self.v_zero_point + (UINT8_OFFSET if v_uint8 else 0)
            args = lis_kernel_constants(self.lis_scale, self.bits, self.v_scale, v_zero_point, heads, vdim)
        self._kernel_args = (key, args)
        return args

    def reference(self, scores: torch.Tensor, v_codes: torch.Tensor) -> torch.Tensor:
        """The torch arithmetic: log2 codes, then attn@V as a float64 matmul of powers of two."""
        v_zero_point = self.v_zero_point + (UINT8_OFFSET if self.v_uint8 else 0)
        return lis_shift_reference(
            scores, v_codes, self.lis_scale, self.bits, self.renormalize, self.v_scale, v_zero_point, self.max_shift
        )

    def extra_repr(self) -> str:
        return (
            f"{self.label}: log2 {self.bits}-bit probabilities (integer exp) @ v codes by shifts up to "
            f"{self.max_shift}" + (", rows renormalized" if self.renormalize else "")
        )
