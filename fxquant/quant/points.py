"""QuantPoint: one place in the graph that is quantized, with its group and spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fxquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class QuantPoint:
    group: str  # qconfig group name, e.g. "attn_q_out"
    section: str  # "weight", "output" or "act"
    spec: QuantSpec
    module: str  # dotted path of the module the point belongs to
    axis: Optional[int] = None  # channel axis for channel/head/group-wise specs
    num_groups: Optional[int] = None  # heads or Q/K/V blocks for head/group-wise specs

    @property
    def label(self) -> str:
        return self.group if self.section == "act" else f"{self.group}.{self.section}"

    def observer_kwargs(self) -> dict:
        if self.spec.granularity == "layer_wise":
            return {}
        if self.spec.granularity == "channel_wise":
            return {"axis": self.axis}
        return {"axis": self.axis, "num_groups": self.num_groups}
