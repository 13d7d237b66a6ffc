"""One-pass CPU kernels for the integer graph's quantize/dequantize boundaries.

``QuantizeCodes`` (float -> codes: divide, round half to even, add the zero point, clamp,
narrow) and ``DequantizeCodes`` (codes -> float: widen, subtract, multiply) are four to five
torch ops each, each a pass over the tensor; the full-integer presets cross such a boundary
around every residual add. ``fxquant_kernels::quantize_rows`` / ``dequantize_rows``
(``fxquant/runtime/csrc/int_rows.cpp``) do the same float32 operations in one pass, so the
codes and values are equal. Used only where the extension is already loaded (a graph holding
an integer LayerNorm, Log-Int-Softmax, a code table or a fused attention loads it), in eager
mode (under ``torch.compile`` inductor fuses the torch ops itself), for a scale and zero point
that are one value or one per channel of the last dimension; ``None`` otherwise, and the
caller runs the torch ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fxquant.runtime.int_attention import kernel_ready
from fxquant.runtime.integer import UINT8_OFFSET, dequantize_codes
from fxquant.runtime.savable import Schema, TensorRule, savable

__all__ = ["fast_quantize", "fast_dequantize", "DequantizeAdd"]


def _flat(param: torch.Tensor, channels: int) -> Optional[torch.Tensor]:
    """``param`` as a (1,) or (channels,) float32 tensor when it broadcasts that way, else None."""
    if param.numel() == 1:
        return param.reshape(1).float()
    if param.dim() >= 1 and param.shape[-1] == channels and param.numel() == channels:
        return param.reshape(channels).float()
    return None


def _ready(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() >= 1 and kernel_ready() and not torch.compiler.is_compiling()


def fast_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    """``fxquant.runtime.integer.quantize_codes`` in one pass, or None (see the module docstring)."""
    if not _ready(x) or x.dtype != torch.float32 or dtype not in (torch.int8, torch.uint8):
        return None
    channels = x.shape[-1]
    s, z = _flat(scale, channels), _flat(zero_point, channels)
    if s is None or z is None or scale.dim() > x.dim() or zero_point.dim() > x.dim():
        return None
    return torch.ops.fxquant_kernels.quantize_rows(x, s, z, qmin, qmax, dtype == torch.uint8)


def fast_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, post_scale: float
) -> Optional[torch.Tensor]:
    """``fxquant.runtime.integer.dequantize_codes`` in one pass, or None (see the module docstring)."""
    if not _ready(codes) or codes.dtype not in (torch.int8, torch.uint8):
        return None
    channels = codes.shape[-1]
    s, z = _flat(scale, channels), _flat(zero_point, channels)
    if s is None or z is None or scale.dim() > codes.dim() or zero_point.dim() > codes.dim():
        return None
    return torch.ops.fxquant_kernels.dequantize_rows(codes, s, z, float(post_scale))


@savable(
    Schema(
        {"label": str, "post_scale": float},
        {
            "scale": TensorRule((torch.float32,), required=True),
            "zero_point": TensorRule((torch.float32,), fits="scale", required=True),
        },
    )
)
class DequantizeAdd(nn.Module):
    """``x + DequantizeCodes(codes)``: a residual add that reads a point's codes (``lower_integer``
    fuses the dequantize into the add). The same float32 operations as the two modules, so the
    sum is equal; one pass (``fxquant_kernels::dequantize_add``) where the extension is loaded."""

    def __init__(self, label: str, scale: torch.Tensor, zero_point: torch.Tensor, post_scale: float = 1.0):
        super().__init__()
        self.label, self.post_scale = label, float(post_scale)
        self.register_buffer("scale", scale.to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.to(torch.float32).clone())

    def to_uint8(self) -> None:
        """Read ``int8 code + 128`` codes (see ``QuantizeCodes.to_uint8``)."""
        self.zero_point += UINT8_OFFSET

    def forward(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if (
            _ready(codes)
            and x.dtype == torch.float32
            and x.shape == codes.shape
            and codes.dtype in (torch.int8, torch.uint8)
        ):
            channels = codes.shape[-1]
            s, z = _flat(self.scale, channels), _flat(self.zero_point, channels)
            if s is not None and z is not None and self.scale.dim() <= codes.dim():
                return torch.ops.fxquant_kernels.dequantize_add(x, codes, s, z, self.post_scale)
        return x + dequantize_codes(codes, self.scale, self.zero_point, self.post_scale)

    def extra_repr(self) -> str:
        return f"x + {self.label} codes -> float"
