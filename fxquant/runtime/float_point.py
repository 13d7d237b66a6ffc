"""A quantization point left in float: the stand-in modules that ``keep_float`` and the
sensitivity tools swap in for a FakeQuantize, a Log-Int-Softmax or a quantized weight."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.runtime.fake_quant import FakeQuantize, QuantConv2d
from fxquant.runtime.log_base_softmax import SOFTMAX_POINT_TYPES
from fxquant.runtime.savable import NUMBER, POINT, Schema, savable


@savable(Schema({"point": POINT, "post_scale": NUMBER}, layout="config"))
class FloatPoint(nn.Module):
    """A FakeQuantize left in float: identity times the folded constant ``post_scale``."""

    def __init__(self, fq: FakeQuantize):
        super().__init__()
        self.point, self.post_scale = fq.point, fq.post_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.post_scale if self.post_scale != 1.0 else x


def float_stand_in(module: nn.Module) -> nn.Module:
    """The float module that computes what ``module`` computes without quantization."""
    if isinstance(module, FakeQuantize):
        return FloatPoint(module)
    if isinstance(module, SOFTMAX_POINT_TYPES):
        return nn.Softmax(module.dim)
    if isinstance(module, QuantConv2d):
        conv = nn.Conv2d(
            module.float_weight.shape[1] * module.groups,
            module.float_weight.shape[0],
            tuple(module.float_weight.shape[2:]),
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            bias=module.bias is not None,
        )
    else:
        conv = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    float_bias = getattr(module, "float_bias", None)  # the bias before bias_correction
    if float_bias is not None and conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros_like(float_bias))
    with torch.no_grad():
        conv.weight.copy_(module.float_weight)
        if conv.bias is not None:
            conv.bias.copy_(float_bias if float_bias is not None else module.bias)
    return conv
