"""How much of a compiled graph's Linear/Conv weight is quantized, and what stayed float and why.

Counted on the fake-quant graph (before any integer lowering), once per weight: a
``QuantLinear``/``QuantConv2d`` is quantized; an ``nn.Linear``/``nn.Conv*`` still called as a
module, or an ``F.linear``/``F.conv*`` call on a stored weight, is float. The share is by
weight elements, so one small float position-bias MLP does not hide a float qkv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxquant.quant.qconfig_groups import ACT, ACTIVATION_GROUPS, LINEAR_GROUPS
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES, FakeQuantize

# below this share of quantized Linear/Conv weight elements, compile says so first
MIN_QUANTIZED_SHARE = 0.9
_FLOAT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONAL = {F.linear, torch._C._nn.linear, F.conv1d, F.conv2d, F.conv3d}


@dataclass
class WeightCoverage:
    quantized: int = 0  # weight elements of quantized Linear/Conv
    total: int = 0  # weight elements of every Linear/Conv the graph runs
    float_weights: list[tuple[str, int, str]] = field(default_factory=list)  # (module, elements, why)
    by_choice: int = 0  # float weight elements whose group the qconfig leaves float on purpose

    @property
    def wanted_share(self) -> float:
        """The quantized share of the weights the qconfig asks to quantize."""
        wanted = self.total - self.by_choice
        return self.quantized / wanted if wanted else 1.0

    @property
    def share(self) -> float:
        return self.quantized / self.total if self.total else 1.0

    def to_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "total": self.total,
            "by_choice": self.by_choice,
            "float_weights": [{"module": m, "elements": n, "reason": r} for m, n, r in self.float_weights],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WeightCoverage":
        rows = [(d["module"], d["elements"], d["reason"]) for d in data.get("float_weights", [])]
        return cls(data["quantized"], data["total"], rows, data.get("by_choice", 0))

    def warning(self, threshold: float = MIN_QUANTIZED_SHARE, listed: int = 8) -> str | None:
        """The lines compile puts first when under ``threshold`` of the weight the qconfig asks
        to quantize is quantized (a preset that leaves a group float on purpose is not warned)."""
        if self.wanted_share >= threshold:
            return None
        rows = sorted(self.float_weights, key=lambda row: -row[1])
        lines = [
            f"WARNING: only {100 * self.share:.1f}% of the Linear/Conv weights are quantized "
            f"({self.quantized} of {self.total} elements); {len(rows)} stayed float:"
        ]
        lines += [f"  {module} ({count} weights): {reason}" for module, count, reason in rows[:listed]]
        if len(rows) > listed:
            lines.append(f"  ... and {len(rows) - listed} more (report.weight_coverage lists them all)")
        return "\n".join(lines)


def _reason(node: fx.Node, float_points: list[str]) -> tuple[str, bool]:
    """Why ``node``'s weight is float, and whether that is the qconfig's choice."""
    for line in float_points:
        if not line.startswith(f"{node.name} ("):
            continue
        why = line[len(node.name) + 1 :].strip()
        if why.endswith(".weight): float"):  # annotate: the qconfig has no spec for the group
            return f"the qconfig gives {why[1 : -len('): float')]} no spec", True
        return why, False
    return "no quantization point was given to this weight", False


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _stored_tensors(weight, hops: int = 3) -> list[fx.Node]:
    """The ``get_attr`` nodes of at least 2 dimensions a functional weight is computed from
    (``W * s``, ``W.t()``: up to ``hops`` function calls away, never through a module call)."""
    found, todo, seen = [], [(weight, 0)] if isinstance(weight, fx.Node) else [], set()
    while todo:
        node, depth = todo.pop()
        if node in seen or node.op in ("placeholder", "call_module") or depth > hops:
            continue
        seen.add(node)
        if node.op == "get_attr":
            meta = node.meta.get("tensor_meta")
            if meta is None or len(getattr(meta, "shape", ())) >= 2:
                found.append(node)
        else:
            todo.extend((arg, depth + 1) for arg in node.all_input_nodes)
    return found


def weight_coverage(gm: fx.GraphModule, float_points: list[str] = ()) -> WeightCoverage:
    """The quantized share of ``gm``'s Linear/Conv weights; ``float_points`` (the report's, one
    ``"<node> (<why>)"`` line per op left float) give the reasons."""
    coverage, seen = WeightCoverage(), set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if not isinstance(module, QUANTIZED_WEIGHT_TYPES + _FLOAT_MODULES) or node.target in seen:
                continue
            seen.add(node.target)
            count = module.weight.numel()
            coverage.total += count
            if isinstance(module, QUANTIZED_WEIGHT_TYPES):
                coverage.quantized += count
            else:
                reason, chosen = _reason(node, float_points)
                coverage.float_weights.append((str(node.target), count, reason))
                coverage.by_choice += count if chosen else 0
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
            for stored in _stored_tensors(weight):
                if stored.target in seen:
                    continue
                seen.add(stored.target)
                count = _attr(gm, str(stored.target)).numel()
                coverage.total += count
                how = "a stored weight" if stored is weight else "a weight computed at run time"
                reason = f"called as {node.target.__name__}() on {how}, not as a module: only modules are quantized"
                coverage.float_weights.append((str(stored.target), count, reason))
    return coverage


def no_activation_warning(gm: fx.GraphModule, qconfig) -> str | None:
    """A warning when ``qconfig`` quantizes activations but none of ``gm``'s ops got a point
    (a model whose ops match none of the activation groups: only its weights are quantized)."""
    if any(isinstance(m, FakeQuantize) for m in gm.modules()):
        return None
    wanted = [g for g in ACTIVATION_GROUPS if qconfig.spec_for(g, ACT) is not None]
    wanted += [f"{g}.output" for g in LINEAR_GROUPS if qconfig.spec_for(g, "output") is not None]
    if not wanted:
        return None
    return (
        f"WARNING: no activation is quantized: {qconfig.name} quantizes {', '.join(wanted[:6])}"
        f"{', ...' if len(wanted) > 6 else ''}, and no op of this model matched those groups "
        "(LayerNorms, GELU, attention found by softmax(q @ k.transpose(-2, -1)) @ v); only weights are quantized"
    )
