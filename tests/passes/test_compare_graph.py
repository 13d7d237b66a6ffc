"""The Before/Expected machinery itself (graph_compare): a wrong Expected must be reported.

Every ``test_*_graph.py`` relies on ``assert_same_structure`` failing when the pass's result
differs from the hand-written Expected; these tests make sure it does, for each kind of
difference, naming the first differing node, and that it does not fail on a mere difference
of insertion order or node names.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from tests.passes.graph_compare import Mlp, assert_same_structure, render, trace_expected


class Variant(nn.Module):
    """The MLP written out, with one deliberate change selected by ``change``."""

    def __init__(self, change: str = ""):
        super().__init__()
        mlp = Mlp()
        self.norm2, self.fc1, self.act, self.fc2 = mlp.norm2, mlp.fc1, mlp.act, mlp.fc2
        if change == "module type":
            self.act = nn.ReLU()
        if change == "module attribute":
            self.act = nn.GELU(approximate="tanh")
        self.change = change

    def forward(self, x):
        h = self.fc1(self.norm2(x))
        if self.change == "argument":
            h = h.transpose(1, 2).transpose(1, 2)
        else:
            h = h.transpose(1, 2).transpose(2, 1)
        if self.change == "extra node":
            h = h * 1.0
        if self.change == "argument order":
            return self.fc2(self.act(h)) - x.mean()
        if self.change == "function":
            return x.mean() + self.fc2(self.act(h))
        return x.mean() - self.fc2(self.act(h))


@pytest.mark.parametrize(
    "change, first_difference",
    [
        ("module type", r"call_module\[act\]\(%\d+\)  # ReLU"),
        ("module attribute", r"GELU\(approximate='tanh'\)"),
        ("argument", r"call_method\[transpose\]\(%\d+, 1, 2\)"),
        ("extra node", r"operator.mul"),
        # operands swapped: the canonical (post-)order meets fc2's chain before the mean
        ("argument order", r"call_module\[norm2\]"),
        ("function", r"operator.add"),
    ],
)
def test_a_wrong_expected_is_reported_at_its_first_difference(change, first_difference):
    actual = trace_expected(Variant())
    with pytest.raises(AssertionError, match=r"graphs differ") as failure:
        assert_same_structure(actual, trace_expected(Variant(change)))
    message = str(failure.value)
    expected_line = next(line for line in message.splitlines() if line.strip().startswith("expected:"))
    assert __import__("re").search(first_difference, expected_line), message
    assert "actual graph:" in message and "%0 = placeholder[x]()" in message  # the whole graph, readable


def test_a_missing_node_at_the_end_is_reported_as_a_length_difference():
    actual = trace_expected(Variant())
    shorter = fx.GraphModule(actual, fx.Graph())
    placeholder = shorter.graph.placeholder("x")
    shorter.graph.output(placeholder)
    with pytest.raises(AssertionError, match=r"graphs differ"):
        assert_same_structure(actual, shorter)
    with pytest.raises(AssertionError, match=r"actual has 3 nodes, expected 2"):
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.call_function(torch.neg, (x,))  # read by nothing: listed after the output's nodes
        graph.output(x)
        assert_same_structure(fx.GraphModule(nn.Module(), graph), shorter)


def test_insertion_order_and_node_names_do_not_matter():
    def build(order: str, prefix: str) -> fx.GraphModule:
        graph = fx.Graph()
        x = graph.placeholder("x")
        made = {}
        for key in order:  # two independent branches, created in either order
            op = torch.neg if key == "a" else torch.abs
            made[key] = graph.call_function(op, (x,), name=f"{prefix}_{key}")
        graph.output(graph.call_function(operator.add, (made["a"], made["b"])))
        return fx.GraphModule(nn.Module(), graph)

    first, second = build("ab", "one"), build("ba", "two")
    assert_same_structure(first, second)
    assert render(first) == render(second)
    x = torch.randn(3)
    torch.testing.assert_close(first(x), second(x))
