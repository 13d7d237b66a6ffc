"""Packed 4-bit weights: two signed 4-bit weight codes per byte.

A Linear whose weight grid fits 4 bits (``qmin >= -8``, ``qmax <= 7``: the ``w4a8`` and
``w4a4`` presets) keeps its (out, in) int8 weight codes as a uint8 tensor of shape
(out, ceil(in / 2)), in memory and in a saved ``.fxq`` file (``passes/pack_int4_weights.py``
packs them at the end of an integer pipeline).

Layout: byte ``j`` of row ``n`` holds the codes of columns ``2j`` (**low nibble**, bits 0-3)
and ``2j + 1`` (high nibble, bits 4-7), each as a 4-bit two's complement number (-8..7 ->
0x8..0x7). With an odd ``in`` the last byte's high nibble is padding (written as 0, ignored
when read).

The integer GEMMs read int8: :class:`PackedWeight` unpacks at call time (a few elementwise
ops over the weight, no float arithmetic), so the GEMM, and its output, are exactly the
unpacked graph's. :func:`weight_storage_bytes` says what a module's weight occupies.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from fxquant.runtime.savable import TensorRule

__all__ = [
    "INT4_MIN",
    "INT4_MAX",
    "WEIGHT_TENSORS",
    "fits_int4",
    "pack_int4",
    "unpack_int4",
    "packed_columns",
    "PackedWeight",
    "unpack_weights",
]

INT4_MIN, INT4_MAX = -8, 7
_LITTLE_ENDIAN = sys.byteorder == "little"
_NIBBLES = -3856  # 0xF0F0 as an int16: the two nibbles at the top of each byte


#: the schema entries of a :class:`PackedWeight` module's weight (the schema also says ``exactly_one``
#: of them): int8 (out, in), or packed uint8 (out, ceil(in / 2))
WEIGHT_TENSORS = {
    "weight_codes": TensorRule((torch.int8,), ndims=(2,), rows="out_features", cols="in_features"),
    "weight_packed": TensorRule((torch.uint8,), ndims=(2,), rows="out_features", packed_cols="in_features"),
}


def fits_int4(qmin: int, qmax: int) -> bool:
    """True when every code of the grid [qmin, qmax] is a signed 4-bit number."""
    return INT4_MIN <= qmin <= qmax <= INT4_MAX


def packed_columns(in_features: int) -> int:
    """Bytes per row of a packed (out, in) weight: ceil(in / 2)."""
    return (in_features + 1) // 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 codes in -8..7 -> (out, ceil(in / 2)) uint8, low nibble first."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"pack_int4 takes a 2-d int8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4: codes span [{int(codes.min())}, {int(codes.max())}], outside the 4-bit range "
            f"[{INT4_MIN}, {INT4_MAX}]"
        )
    rows, cols = codes.shape
    if cols % 2:
        codes = torch.cat([codes, codes.new_zeros(rows, 1)], dim=1)
    nibbles = codes.to(torch.int16).bitwise_and_(0xF).reshape(rows, codes.shape[1] // 2, 2)
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, ceil(in / 2)) uint8 -> contiguous (out, in) int8 codes (the inverse of :func:`pack_int4`)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_columns(in_features):
        raise ValueError(
            f"unpack_int4: expected a uint8 tensor (out, {packed_columns(in_features)}) for in_features "
            f"{in_features}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.numel() == 0:
        return torch.zeros(packed.shape[0], in_features, dtype=torch.int8, device=packed.device)
    if _LITTLE_ENDIAN:
        # each byte b -> one int16 (b_lo << 4) | (b_hi << 12), i.e. the int8 pair (lo << 4, hi << 4);
        # an arithmetic shift right by 4 sign-extends both nibbles at once (about 2x the stack below)
        wide = packed.to(torch.int16)
        wide = torch.bitwise_left_shift(wide, 4).bitwise_or_(torch.bitwise_left_shift(wide, 8)).bitwise_and_(_NIBBLES)
        codes = wide.view(torch.int8).bitwise_right_shift_(4)
    else:
        signed = packed.view(torch.int8)
        low = torch.bitwise_left_shift(signed, 4).bitwise_right_shift_(4)  # arithmetic shift: sign-extends
        codes = torch.stack((low, torch.bitwise_right_shift(signed, 4)), dim=-1).reshape(packed.shape[0], -1)
    return codes if codes.shape[1] == in_features else codes[:, :in_features].contiguous()


class PackedWeight:
    """Mixin of the integer Linears (``IntLinear``, ``OnednnLinear``): the weight is either the
    ``weight_codes`` buffer ((out, in) int8) or the ``weight_packed`` buffer (4-bit codes, two
    per byte); the other one is None. The host module sets ``in_features``/``out_features``."""

    weight_codes: Optional[torch.Tensor]
    weight_packed: Optional[torch.Tensor]
    in_features: int

    @property
    def packed(self) -> bool:
        return getattr(self, "weight_packed", None) is not None

    def int8_weight(self) -> torch.Tensor:
        """The (out, in) int8 weight codes (unpacked here when the weight is packed)."""
        if self.packed:
            return unpack_int4(self.weight_packed, self.in_features)
        return self.weight_codes

    def pack_weight(self) -> None:
        """Store the weight two 4-bit codes per byte (ValueError when a code is outside -8..7)."""
        if self.packed:
            return
        packed = pack_int4(self.weight_codes)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_codes", None)

    def unpack_weight(self) -> None:
        """Store the weight as int8 codes again: twice the bytes, no unpacking per call (and
        ``OnednnLinear`` caches oneDNN's prepacked copy again)."""
        if self.packed:
            codes = self.int8_weight()
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_packed", None)

    def weight_storage_bytes(self) -> int:
        """Bytes the weight codes occupy (packed or int8); per-output constants are not counted."""
        weight = self.weight_packed if self.packed else self.weight_codes
        return weight.numel() * weight.element_size()


def unpack_weights(gm: torch.nn.Module) -> int:
    """Every packed weight of ``gm`` stored as int8 codes again (speed over memory: the oneDNN
    Linears prepack a packed weight on every call); returns how many were unpacked."""
    unpacked = 0
    for module in gm.modules():
        if isinstance(module, PackedWeight) and module.packed:
            module.unpack_weight()
            unpacked += 1
    return unpacked
