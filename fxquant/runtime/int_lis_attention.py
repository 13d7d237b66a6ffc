"""The full-integer attention core as one CPU kernel: q @ kT, score codes, Log-Int-Softmax, attn@V.

In the ``fqvit_w8a8``/``int8_all`` integer graphs with ``int_kernels="onednn"``, an attention is

    score codes = IntMatmul(q codes, kT codes)      exact int32, float32 requantization
    scores      = DequantizeCodes(score codes)
    out         = LisShiftMatmul(scores, v codes)   log2 probabilities, attn@V by shifts

``IntLisAttention`` computes the three per (batch, head) in ``fxquant_kernels::int_attention_lis``
(``fxquant/runtime/csrc/int_attention.cpp``): the int8 GEMM and the score codes as
``IntAttention`` computes them, then the Log-Int-Softmax of ``lis_rows.h`` straight from the
codes: ``round(scores / s) - max`` is ``code - max(code)`` whenever the scores' grid ``s``
is the dequantization's scale (``fuse_int_attention`` fuses only then), so the (B, H, N, N)
scores are never written as floats. The output equals the three modules' bit for bit
(``reference`` runs them in torch: the fallback where the kernel is not built).
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.runtime.int_attention import kernel_ready, load_kernel
from fxquant.runtime.log_int_softmax import lis_kernel_constants, lis_shift_reference
from fxquant.runtime.savable import Schema, TensorRule, savable

__all__ = ["IntLisAttention", "SCORE_CONSTANTS"]

# per-head constants of the score codes, in this order (columns of score_constants)
SCORE_CONSTANTS = ("q_zero_point", "k_zero_point", "score_multiplier", "score_zero_point")


@savable(
    Schema(
        {"label": str, "qmin": int, "qmax": int, "bits": int, "renormalize": bool, "max_shift": int},
        {
            "score_constants": TensorRule((torch.float32,), ndims=(2,), required=True),
            "lis_scale": TensorRule((torch.float32,), required=True),
            "v_scale": TensorRule((torch.float64,), required=True),
            "v_zero_point": TensorRule((torch.float64,), fits="v_scale", required=True),
        },
    )
)
class IntLisAttention(nn.Module):
    """``LisShiftMatmul(dequantize(requantize(q @ kT)), v)`` on codes, one kernel.

    ``score_constants`` (H or 1, 4) float32: per head the columns ``SCORE_CONSTANTS`` (zero
    points in the domain of the codes they apply to: uint8 codes, int8 zero point + 128);
    ``lis_scale``: the scores' grid (as ``LisShiftMatmul``); ``v_scale``/``v_zero_point``: V's
    point, the zero point in the domain of the V codes given. Inputs q (B, H, N, D), kT
    (B, H, D, M), v (B, H, M, Dv) int8 or uint8 codes; output float32 (B, H, N, Dv).
    """

    _kernel_args = None  # ((heads, Dv), constants of the kernel), built on first use

    def __init__(
        self,
        score_constants: torch.Tensor,
        qmin: int,
        qmax: int,
        lis_scale: torch.Tensor,
        bits: int,
        renormalize: bool,
        v_scale: torch.Tensor,
        v_zero_point: torch.Tensor,
        max_shift: int,
        label: str = "",
    ):
        super().__init__()
        if score_constants.dim() != 2 or score_constants.shape[1] != len(SCORE_CONSTANTS):
            raise ValueError(f"score_constants must be (heads, 4), got {tuple(score_constants.shape)}")
        self.qmin, self.qmax, self.bits, self.renormalize = int(qmin), int(qmax), int(bits), bool(renormalize)
        self.max_shift, self.label = int(max_shift), label
        self.register_buffer("score_constants", score_constants.to(torch.float32).contiguous().clone())
        self.register_buffer("lis_scale", lis_scale.to(torch.float32).clone())
        self.register_buffer("v_scale", v_scale.to(torch.float64).clone())
        self.register_buffer("v_zero_point", v_zero_point.to(torch.float64).clone())
        load_kernel()

    def forward(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and q.dim() == 4 and kt.dim() == 4 and v.dim() == 4:
            batch, heads = q.shape[:2]
            key = (heads, v.shape[-1])
            cached = self._kernel_args
            args = cached[1] if cached is not None and cached[0] == key else self.kernel_args(key)
            if args is not None and kernel_ready():
                return torch.ops.fxquant_kernels.int_attention_lis(
                    q,
                    kt.expand(batch, heads, -1, -1),
                    v.expand(batch, heads, -1, -1),
                    args[0],
                    self.qmin,
                    self.qmax,
                    *args[1:],
                    self.bits,
                    self.max_shift,
                    self.renormalize,
                )
        return self.reference(q, kt, v)

    @torch.compiler.disable
    def kernel_args(self, key: tuple) -> tuple | None:
        """(score constants (H, 4), exp table, V scale, V zero point) for the kernel, kept."""
        heads, vdim = key
        args = None
        if load_kernel():
            lis = lis_kernel_constants(self.lis_scale, self.bits, self.v_scale, self.v_zero_point, heads, vdim)
            c = self.score_constants
            if lis is not None and c.shape[0] in (1, heads):
                args = (c.expand(heads, c.shape[1]).contiguous(), *lis[1:])
        self._kernel_args = (key, args)
        return args

    def reference(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The three unfused ops in torch: score codes (float32 on integers: exact products),
        dequantized on the scores' grid, then ``LisShiftMatmul``'s arithmetic."""
        c = self.score_constants.t().reshape(len(SCORE_CONSTANTS), -1, 1, 1)
        zq, zk, multiplier, zs = c.unbind(0)
        acc = torch.matmul(q.to(torch.float32) - zq, kt.to(torch.float32) - zk)
        codes = torch.round(acc * multiplier).add_(zs).clamp_(self.qmin, self.qmax)
        grid = self.lis_scale.reshape(-1, 1, 1) if self.lis_scale.numel() > 1 else self.lis_scale
        scores = (codes - zs) * grid  # the gaps to each row's largest score are those of the codes
        return lis_shift_reference(
            scores, v, self.lis_scale, self.bits, self.renormalize, self.v_scale, self.v_zero_point, self.max_shift
        )

    def extra_repr(self) -> str:
        return (
            f"{self.label}: q @ kT (int8 GEMM) -> score codes [{self.qmin}, {self.qmax}] -> log2 {self.bits}-bit "
            f"probabilities (integer exp) -> @ v by shifts up to {self.max_shift}, one fused kernel"
        )
