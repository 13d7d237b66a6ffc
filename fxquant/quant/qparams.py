"""QParams: the one place where a scale's shape and broadcast axis are decided."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class QParams:
    """Quantization parameters of one point.

    ``scale`` and ``zero_point`` are 0-d tensors (per-tensor) or 1-d tensors whose length
    equals the size of ``axis`` in the tensor they quantize (per-channel; head- and
    group-wise scales are expanded to one entry per channel, so every consumer sees one
    layout). ``zero_point`` holds integer values in float32 so it broadcasts without casts.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32)
        self.zero_point = torch.as_tensor(self.zero_point, dtype=torch.float32)
        if self.scale.dim() > 1:
            raise ValueError(f"scale must be 0-d or 1-d, got shape {tuple(self.scale.shape)}")
        if self.scale.dim() == 1 and self.axis is None:
            raise ValueError("a per-channel scale needs an axis")
        if self.scale.dim() == 0:
            self.axis = None
        if self.zero_point.shape != self.scale.shape:
            self.zero_point = self.zero_point.expand_as(self.scale).clone()
        if not torch.all(torch.isfinite(self.scale)) or not torch.all(self.scale > 0):
            raise ValueError("scale must be finite and positive")

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1

    def _shape_for(self, ndim: int) -> list[int]:
        if not self.per_channel:
            return []
        axis = self.axis % ndim
        shape = [1] * ndim
        shape[axis] = self.scale.numel()
        return shape

    def broadcast_scale(self, ndim: int) -> torch.Tensor:
        """The scale reshaped to broadcast against a tensor of ``ndim`` dimensions."""
        return self.scale.reshape(self._shape_for(ndim)) if self.per_channel else self.scale

    def broadcast_zero_point(self, ndim: int) -> torch.Tensor:
        zp = self.zero_point
        return zp.reshape(self._shape_for(ndim)) if self.per_channel else zp

    def to(self, device: torch.device | str) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device), self.qmin, self.qmax, self.axis)
