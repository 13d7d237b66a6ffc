"""PassManager: runs passes in order, calls instruments, and turns failures into PassError."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxquant.analysis.instruments import NumericDiff
from fxquant.errors import FxqError, NodeError, PassError
from fxquant.infra.pass_manager import Instrument, Pass, PassContext, PassManager
from fxquant.infra.records import Report
from fxquant.ir.trace import trace
from fxquant.quant.qconfig import load_qconfig


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) + 1.0)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    gm = trace(Tiny().eval())
    x = torch.randn(3, 4)
    ctx = PassContext(
        qconfig=load_qconfig({}),
        reference=copy.deepcopy(gm),
        diff_inputs=(x,),
        report=Report(model="Tiny", qconfig="custom", backend="fake"),
    )
    return gm, ctx


class Noop(Pass):
    neutral = True

    def __init__(self, name: str):
        self.name = name

    def run(self, gm, ctx):
        ctx.state.setdefault("ran", []).append(self.name)
        return gm


class Boom(Pass):
    """Fails on one node, after telling the context which node it is working on."""

    name = "boom"

    def __init__(self, exc: Exception, where: str = "add"):
        self.exc, self.where = exc, where

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            ctx.current_node = node.name
            if node.name == self.where:
                raise self.exc
        return gm


def test_exception_becomes_pass_error_naming_pass_node_and_before(setup):
    gm, ctx = setup
    original = ZeroDivisionError("division by zero")
    manager = PassManager([Noop("first"), Noop("second"), Boom(original), Noop("never")])
    with pytest.raises(PassError) as info:
        manager.run(gm, ctx)
    err = info.value
    message = str(err)
    assert "'boom'" in message and "'add'" in message
    assert "ZeroDivisionError" in message and "division by zero" in message
    assert "first, second" in message
    assert (err.pass_name, err.node, err.before) == ("boom", "add", ("first", "second"))
    assert err.__cause__ is original
    assert isinstance(err, FxqError)
    assert ctx.state["ran"] == ["first", "second"]  # nothing after the failure ran
    assert [p.name for p in ctx.report.passes] == ["first", "second"]


def test_first_pass_failing_says_none_ran_before(setup):
    gm, ctx = setup
    with pytest.raises(PassError) as info:
        PassManager([Boom(RuntimeError("bad"), where="fc1")]).run(gm, ctx)
    assert "passes run before it: none" in str(info.value)
    assert info.value.before == () and info.value.node == "fc1"


def test_node_error_names_its_own_node(setup):
    gm, ctx = setup
    with pytest.raises(PassError) as info:
        PassManager([Noop("a"), Boom(NodeError("relu", "cannot handle this"), where="fc2")]).run(gm, ctx)
    err = info.value
    assert err.node == "relu"  # the NodeError's node wins over ctx.current_node
    assert "node 'relu': cannot handle this" in str(err) and "'boom'" in str(err) and "a" in err.before


def test_failure_without_current_node(setup):
    gm, ctx = setup

    class Early(Pass):
        name = "early"

        def run(self, gm, ctx):
            raise KeyError("missing")

    with pytest.raises(PassError) as info:
        PassManager([Early()]).run(gm, ctx)
    assert info.value.node == "" and "at node" not in str(info.value)


def test_current_node_is_reset_between_passes(setup):
    gm, ctx = setup

    class Marks(Pass):
        name = "marks"

        def run(self, gm, ctx):
            ctx.current_node = "fc1"
            return gm

    class FailsAtStart(Pass):
        name = "fails"

        def run(self, gm, ctx):
            raise ValueError("no node yet")

    with pytest.raises(PassError) as info:
        PassManager([Marks(), FailsAtStart()]).run(gm, ctx)
    assert info.value.node == ""  # not the previous pass's node


def test_requires_and_ensures_failures_name_the_pass(setup):
    gm, ctx = setup

    class NeedsObservers(Noop):
        def requires(self, gm, ctx):
            raise RuntimeError("graph has no observers")

    class BreaksPromise(Noop):
        def ensures(self, gm, ctx):
            raise RuntimeError("promise broken")

    with pytest.raises(PassError, match="'needs'.*graph has no observers"):
        PassManager([NeedsObservers("needs")]).run(gm, ctx)
    with pytest.raises(PassError, match="'breaks'.*promise broken.*passes run before it: ok"):
        PassManager([Noop("ok"), BreaksPromise("breaks")]).run(gm, ctx)


def test_broken_graph_is_caught_by_lint(setup):
    gm, ctx = setup

    class Dangling(Pass):
        name = "dangling"

        def run(self, gm, ctx):
            node = next(n for n in gm.graph.nodes if n.name == "fc2")
            other = fx.Graph().placeholder("elsewhere")  # a node from another graph
            node.args = (other,)
            return gm

    with pytest.raises(PassError, match="'dangling'"):
        PassManager([Dangling()]).run(gm, ctx)


def test_pass_error_raised_inside_is_not_wrapped_twice(setup):
    gm, ctx = setup
    inner = PassError("inner failure", pass_name="inner", node="x", before=())
    with pytest.raises(PassError) as info:
        PassManager([Noop("a"), Boom(inner)]).run(gm, ctx)
    assert info.value is inner


def test_unique_pass_names():
    with pytest.raises(ValueError, match="unique"):
        PassManager([Noop("a"), Noop("a")])


def test_instruments_and_report_records(setup):
    gm, ctx = setup
    calls = []

    class Recorder(Instrument):
        def run_before_pass(self, p, gm, ctx):
            calls.append(("before", p.name))

        def run_after_pass(self, p, gm, ctx, record):
            assert record.name == p.name
            calls.append(("after", p.name))

    class AddZero(Pass):
        """Numerically neutral rewrite: y = relu + 0."""

        name = "add_zero"
        neutral = True

        def run(self, gm, ctx):
            relu = next(n for n in gm.graph.nodes if n.name == "relu")
            with gm.graph.inserting_after(relu):
                plus = gm.graph.call_function(operator.add, (relu, 0.0))
            relu.replace_all_uses_with(plus, delete_user_cb=lambda user: user is not plus)
            plus.meta.update({"fxq.origin": "relu", "fxq.module": ""})
            return gm

    out = PassManager([Noop("a"), AddZero()], [Recorder(), NumericDiff()]).run(gm, ctx)
    assert calls == [("before", "a"), ("after", "a"), ("before", "add_zero"), ("after", "add_zero")]
    assert [r.name for r in ctx.report.passes] == ["a", "add_zero"]
    record = ctx.report.passes[-1]
    assert record.output_qsnr_db == float("inf")
    assert record.node("add_1")["origin"] == "relu"  # paired with the FP32 node it computes
    assert "add_1" in out.code  # recompiled after the pass
