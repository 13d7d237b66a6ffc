"""An element-wise float op between two 8-bit points, as a table from codes to codes.

In the integer graph an activation that stays in float (``int8_all``'s GELU) sits between
the codes of its input point and the codes of its output point:

    DequantizeCodes(in codes) -> GELU -> QuantizeCodes(out point)

Its input has only 256 possible codes, so the three ops are a function from an input code
to an output code: ``CodeLut`` runs the same three modules once on the 256 codes when it is
built and then looks each code up (``fxquant_kernels::code_lut``, one byte read and one
written per element; a torch gather where the kernel is not built). The table holds the
codes the three ops give; in the graph they run on the whole tensor, where torch's
vectorized and scalar paths of an op such as GELU's erf can differ in the last float32 bit
(a code can then differ by one step where the value sits on a rounding boundary).
One table per channel where a scale or zero point varies along the last dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.runtime.int_attention import kernel_ready, load_kernel
from fxquant.runtime.integer import UINT8_OFFSET
from fxquant.runtime.savable import Schema, TensorRule, savable

__all__ = ["CodeLut", "code_table"]


def code_table(dequantize: nn.Module, op, quantize: nn.Module, in_uint8: bool, channels: int) -> torch.Tensor:
    """uint8 (T, 256): for each channel (T = ``channels``, or 1) and each input byte, the byte of
    the output code ``quantize(op(dequantize(code)))``, running the given modules as they are."""
    codes = torch.arange(256, dtype=torch.int64)
    codes = (codes if in_uint8 else codes - 256 * (codes >= UINT8_OFFSET)).to(torch.uint8 if in_uint8 else torch.int8)
    ndim = max([2] + [t.dim() for m in (dequantize, quantize) for t in m.buffers()])  # in-place ops keep the rank
    codes = codes[:, None].expand(256, channels).reshape((1,) * (ndim - 2) + (256, channels)).contiguous()
    with torch.no_grad():
        out = quantize(op(dequantize(codes)))
    if out.numel() != 256 * channels:
        raise ValueError(
            f"the dequantize/op/quantize chain gives {tuple(out.shape)} from (256, {channels}) codes: "
            "its scales vary along more than the last dimension"
        )
    return out.reshape(256, channels).t().contiguous().view(torch.uint8)


@savable(
    Schema(
        {"label": str, "qmin": int, "qmax": int, "in_uint8": bool, "codes_dtype": ("int8", "uint8")},
        {"table": TensorRule((torch.uint8,), ndims=(2,), required=True)},
    )
)
class CodeLut(nn.Module):
    """Codes of one point -> codes of the next through ``table`` (T, 256) uint8, indexed by the
    input code's byte (T = 1, or one table per channel of the last dimension)."""

    def __init__(self, table: torch.Tensor, qmin: int, qmax: int, out_uint8: bool, in_uint8: bool, label: str = ""):
        super().__init__()
        if table.dtype != torch.uint8 or table.dim() != 2 or table.shape[1] != 256:
            raise ValueError(f"a code table is uint8 (T, 256), got {table.dtype} {tuple(table.shape)}")
        self.label, self.qmin, self.qmax, self.in_uint8 = label, int(qmin), int(qmax), bool(in_uint8)
        self.codes_dtype = "uint8" if out_uint8 else "int8"
        self.register_buffer("table", table.contiguous().clone())
        load_kernel()

    def to_uint8(self) -> None:
        """Emit ``int8 code + 128`` as uint8 (oneDNN's activation type); same values."""
        if self.codes_dtype == "uint8":
            return
        self.table = self.table ^ UINT8_OFFSET  # byte of c + 128 = byte of c with the top bit flipped
        self.qmin, self.qmax, self.codes_dtype = self.qmin + UINT8_OFFSET, self.qmax + UINT8_OFFSET, "uint8"

    def input_to_uint8(self, index: int = 0) -> None:
        """The input arrives as uint8 codes (int8 code + 128): the byte flips its top bit."""
        if index != 0:
            raise ValueError("CodeLut reads one operand")
        if not self.in_uint8:
            self.table = self.table[:, torch.arange(256) ^ UINT8_OFFSET].contiguous()
            self.in_uint8 = True

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        out_uint8 = self.codes_dtype == "uint8"
        if codes.device.type == "cpu" and (kernel_ready() or (not torch.compiler.is_compiling() and load_kernel())):
            return torch.ops.fxquant_kernels.code_lut(codes, self.table, out_uint8)
        return self.reference(codes)

    def reference(self, codes: torch.Tensor) -> torch.Tensor:
        """The lookup in torch: a gather of the table by the codes' bytes."""
        index = codes.view(torch.uint8).to(torch.int64)
        if self.table.shape[0] == 1:
            out = self.table[0][index]
        else:
            out = torch.gather(self.table.t(), 0, index.reshape(-1, index.shape[-1])).reshape(index.shape)
        return out if self.codes_dtype == "uint8" else out.view(torch.int8)

    def extra_repr(self) -> str:
        return f"{self.label}: {self.table.shape[0]} table(s) of 256 codes -> {self.codes_dtype} codes"
