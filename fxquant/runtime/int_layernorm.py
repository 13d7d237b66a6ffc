"""LayerNorm on integer codes (``backend="int"``), inserted by ``lower_integer`` where a
LayerNorm's input is a PTF point and its output a quantization point."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.quant.ptf import ptf_layernorm_codes
from fxquant.runtime.int_attention import kernel_ready, load_kernel
from fxquant.runtime.integer import UINT8_OFFSET
from fxquant.runtime.savable import Schema, TensorRule, savable


@savable(
    Schema(
        {
            "in_label": str,
            "out_label": str,
            "in_zero_point": int,
            "eps_int": int,
            "sigma_bits": int,
            "out_zero_point": int,
            "qmin": int,
            "qmax": int,
            "codes_dtype": ("int8", "uint8"),
        },
        {
            "alpha": TensorRule((torch.int64,), ndims=(1,), required=True),
            "weight_units": TensorRule((torch.float64,), like="alpha", required=True),
            "offset": TensorRule((torch.int64,), like="alpha", required=True),
        },
    )
)
class IntLayerNorm(nn.Module):
    """LayerNorm from the codes of a PTF input point to the codes of its output point, in
    integer arithmetic (FQ-ViT's integer LayerNorm; the kernel is ``fxquant.quant.ptf``'s):
    shift by alpha, exact int64 mean and variance, integer square root, one dyadic
    multiplier per row and channel. Input and output codes are int8 (shifted codes)."""

    def __init__(self, constants, in_shift: int, out_shift: int, in_label: str = "", out_label: str = ""):
        super().__init__()
        self.in_label, self.out_label = in_label, out_label
        self.in_zero_point = constants.in_zero_point - in_shift  # on the shifted int8 codes
        self.eps_int, self.sigma_bits = constants.eps_int, constants.sigma_bits
        self.out_zero_point = constants.out_zero_point - out_shift
        self.qmin, self.qmax = constants.qmin - out_shift, constants.qmax - out_shift
        self.register_buffer("alpha", constants.alpha.to(torch.int64).clone())
        self.register_buffer("weight_units", constants.weight_units.to(torch.float64).clone())
        self.register_buffer("offset", constants.offset.to(torch.int64).clone())

    codes_dtype = "int8"  # "uint8" after to_uint8()

    def to_uint8(self) -> None:
        """Emit ``int8 code + 128`` as uint8 (oneDNN's activation type); same values."""
        self.out_zero_point += UINT8_OFFSET
        self.qmin, self.qmax, self.codes_dtype = self.qmin + UINT8_OFFSET, self.qmax + UINT8_OFFSET, "uint8"

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.device.type == "cpu" and self._kernel():
            return torch.ops.fxquant_kernels.ptf_layernorm(codes, *self._constants(), self.codes_dtype == "uint8")
        return self.reference(codes)

    def _constants(self) -> tuple:
        """What the kernel and the reference take after the codes, in their order."""
        return (
            self.alpha,
            self.in_zero_point,
            self.eps_int,
            self.sigma_bits,
            self.weight_units,
            self.offset,
            self.out_zero_point,
            self.qmin,
            self.qmax,
        )

    def _kernel(self) -> bool:
        """The C++ kernel (``fxquant/runtime/csrc/int_rows.cpp``: one pass per row, the same
        integers and float64 roundings as ``reference``) is built."""
        return kernel_ready() or (not torch.compiler.is_compiling() and load_kernel())

    def reference(self, codes: torch.Tensor) -> torch.Tensor:
        """The torch arithmetic (``fxquant.quant.ptf.ptf_layernorm_codes``, int64 ops)."""
        out = ptf_layernorm_codes(codes, *self._constants())
        return out.to(torch.uint8 if self.codes_dtype == "uint8" else torch.int8)

    def extra_repr(self) -> str:
        return f"{self.alpha.numel()} channels, codes of {self.in_label} (PTF) -> codes of {self.out_label}"
