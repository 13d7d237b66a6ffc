"""What a compiled graph's Linear/Conv weights occupy, against the same weights in FP32.

Counted once per weight-holding module of the graph:

* an integer Linear (``IntLinear``, ``OnednnLinear``): its weight codes, int8 or packed
  4-bit (``fxquant.runtime.int4_weights``) -- the *integer weight bytes*;
* a layer the graph still runs in float (``QuantLinear``/``QuantConv2d`` of the fake-quant
  graph or of an integer graph's float leftovers, ``nn.Linear``/``nn.Conv*``): every weight
  tensor it holds (the float32 weight, and its int8 codes where it keeps them).

The FP32 figure is each of those weights as float32 (elements x 4). Per-output constants
(scales, biases, requantization multipliers) are not weights and are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.fx as fx
from torch import nn

from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES
from fxquant.runtime.int4_weights import PackedWeight

_FLOAT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FLOAT_WEIGHTS = ("weight", "weight_codes", "float_weight")  # what a fake-quant weight module may hold
MIB = 2**20


@dataclass
class WeightBytes:
    fp32: int = 0  # every counted weight as float32
    integer: int = 0  # integer Linears' weight codes (int8 or packed 4-bit)
    integer_fp32: int = 0  # the same weights as float32
    float_held: int = 0  # weight tensors of the layers that still run in float
    packed_layers: int = 0
    int8_layers: int = 0
    float_layers: int = 0

    @property
    def total(self) -> int:
        return self.integer + self.float_held

    @property
    def integer_share(self) -> float:
        """Integer weight bytes / FP32 bytes of all weights (0.125 when every weight is packed 4-bit)."""
        return self.integer / self.fp32 if self.fp32 else 0.0

    @property
    def total_share(self) -> float:
        """All weight bytes the graph holds / FP32 bytes of all weights."""
        return self.total / self.fp32 if self.fp32 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "integer_share": self.integer_share, "total_share": self.total_share}

    def note(self) -> str:
        return (
            f"weight bytes: {self.integer / MIB:.2f} MiB integer ({self.packed_layers} Linears packed 4-bit, "
            f"{self.int8_layers} int8) = {100 * self.integer_share:.1f}% of the FP32 weights "
            f"({self.fp32 / MIB:.2f} MiB); with the {self.float_layers} layers held in float "
            f"({self.float_held / MIB:.2f} MiB) {100 * self.total_share:.1f}%"
        )


def weight_bytes(gm: fx.GraphModule | nn.Module) -> WeightBytes:
    """The weight bytes of ``gm`` (a compiled graph, or any module) against FP32."""
    out = WeightBytes()
    for module in gm.modules():
        if isinstance(module, PackedWeight):
            fp32 = module.in_features * module.out_features * 4
            out.integer += module.weight_storage_bytes()
            out.integer_fp32 += fp32
            out.fp32 += fp32
            out.packed_layers += module.packed
            out.int8_layers += not module.packed
        elif isinstance(module, (*QUANTIZED_WEIGHT_TYPES, *_FLOAT_MODULES)):
            tensors = [getattr(module, name, None) for name in _FLOAT_WEIGHTS]
            tensors = [t for t in tensors if t is not None]
            out.float_held += sum(t.numel() * t.element_size() for t in tensors)
            out.fp32 += module.weight.numel() * 4
            out.float_layers += 1
    return out


__all__ = ["WeightBytes", "weight_bytes"]
