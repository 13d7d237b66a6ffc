"""Running a graph and keeping every node's value (the numeric diff, the lowering and the
equivalence checks all read a graph's values this way)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n.name] = value
        return value


@torch.no_grad()
def capture_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Run ``gm`` and keep every node's value, by node name."""
    recorder = _Recorder(gm)
    recorder.run(*inputs)
    return recorder.values


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_tensors(v)]
    return []
