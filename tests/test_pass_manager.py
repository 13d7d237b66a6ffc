"""PassManager: runs passes in order, calls instruments, and turns failures into PassError."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxquant.analysis.instruments import NumericDiff
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.errors import FxqError, NodeError, PassError
from fxquant.infra.contracts import Contract, PipelineOrderError, Prop
from fxquant.infra.pass_manager import Instrument, Pass, PassContext, PassManager
from fxquant.infra.records import Report
from fxquant.ir.trace import trace
from fxquant.passes import (
    Annotate,
    Calibrate,
    DecomposeAttention,
    FuseIntAttention,
    FuseScales,
    InsertObservers,
    LowerFakeQuant,
    LowerInteger,
    Smooth,
    SplitQkv,
    UseOnednnKernels,
)
from fxquant.pipeline import default_passes, stages
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
        ctx.note(f"{self.name} ran")
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
    assert [p.name for p in ctx.report.passes] == ["first", "second"]  # nothing after the failure ran
    assert [p.notes for p in ctx.report.passes] == [["first ran"], ["second ran"]]


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


# ------------------------------------------------------------------ contracts: the order
def test_every_default_pipeline_meets_its_contracts():
    for backend, kernels in (("fake", "portable"), ("int", "portable"), ("int", "onednn")):
        manager = PassManager(default_passes(backend, kernels))
        assert Prop.OBSERVED not in manager.holds_after  # lower_fake_quant replaced the observers
        assert (Prop.INTEGER in manager.holds_after) == (backend == "int")
        assert (Prop.FAKE_QUANT in manager.holds_after) == (backend == "fake")
        assert (Prop.ATTENTION_FUSED in manager.holds_after) == (kernels == "onednn")
    for p in default_passes("int", "onednn"):  # every pass of fxquant declares one
        assert type(p).__dict__.get("contract") is not None, p.name


def test_misordered_pipeline_fails_at_construction_naming_both_passes():
    passes = [DecomposeAttention(), Annotate(), InsertObservers(), LowerFakeQuant(), Calibrate()]
    with pytest.raises(PipelineOrderError) as info:
        PassManager(passes)
    assert str(info.value) == (
        "pass 'lower_fake_quant' requires 'calibrated', which 'calibrate' provides, "
        "but 'calibrate' comes after it in this pipeline"
    )
    err = info.value
    assert (err.pass_name, err.prop, err.before) == ("lower_fake_quant", Prop.CALIBRATED, passes_named(passes[:3]))
    assert isinstance(err, PassError)


def passes_named(passes) -> tuple:
    return tuple(p.name for p in passes)


def test_missing_provider_fails_naming_it():
    with pytest.raises(
        PipelineOrderError,
        match=r"^pass 'calibrate' requires 'observed', which 'insert_observers' "
        r"provides, but 'insert_observers' is not in this pipeline$",
    ):
        PassManager([Annotate(), Calibrate()])
    with pytest.raises(PipelineOrderError, match="'use_onednn_kernels' requires 'integer', which 'lower_integer'"):
        PassManager(default_passes("fake") + [UseOnednnKernels(), FuseIntAttention()])


def test_property_removed_by_an_earlier_pass_is_named():
    passes = [Annotate(), InsertObservers(), Calibrate(), LowerFakeQuant(), FuseScales()]
    with pytest.raises(PipelineOrderError, match="'fuse_scales' requires 'observed', which 'lower_fake_quant' removes"):
        PassManager(passes)


def test_pass_that_must_come_first_is_refused_after():
    with pytest.raises(PipelineOrderError) as info:
        PassManager([Annotate(), InsertObservers(), Smooth()])
    assert str(info.value) == (
        "pass 'smooth' must run before the graph is 'observed', but 'insert_observers' provides it earlier "
        "in this pipeline"
    )
    with pytest.raises(PipelineOrderError, match="'decompose_attention' must run before the graph is 'annotated'"):
        PassManager([Annotate(), DecomposeAttention()])
    with pytest.raises(
        PipelineOrderError, match="'annotate' must run before the graph is 'qkv_split', but 'split_qkv'"
    ):
        PassManager([SplitQkv(), Annotate()])


def test_holds_resumes_a_pipeline():
    """A pipeline resumed on a fake-quant graph (compile's keep_float) starts from what holds."""
    fake, integer = stages(default_passes("int", "onednn"))
    assert [p.name for p in integer] == [
        "lower_integer",
        "use_onednn_kernels",
        "fuse_residual_adds",
        "fuse_int_attention",
    ]
    with pytest.raises(PipelineOrderError, match="'lower_integer' requires 'fake_quant'"):
        PassManager(integer)
    first = PassManager(fake)
    second = PassManager(integer, holds=first.holds_after)
    assert second.holds == first.holds_after and Prop.FAKE_QUANT not in second.holds_after
    fake_only, none = stages(default_passes("fake"))
    assert [p.name for p in fake_only] == [p.name for p in fake] and none == []


def test_custom_pass_without_a_contract_needs_and_promises_nothing(setup):
    gm, ctx = setup
    assert Noop("a").contract == Contract()
    manager = PassManager([Noop("a"), LowerInteger()], holds={"fake_quant"})  # plain names work too
    assert manager.holds_after == {Prop.INTEGER}


def test_contract_takes_only_known_properties():
    with pytest.raises(ValueError, match="calibratd"):
        Contract(requires={"calibratd"})


# ------------------------------------------------------------------ neutral passes
class ScaleOutput(Pass):
    """Declared neutral, but multiplies fc2's weight: the output changes."""

    name = "scale_output"
    neutral = True

    def __init__(self, factor: float):
        self.factor = factor

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule("fc2").weight.mul_(self.factor)
        return gm


def test_non_neutral_neutral_pass_fails_with_the_measured_db(setup):
    gm, ctx = setup
    with torch.no_grad():
        before = gm(*ctx.diff_inputs)
        expected = output_qsnr(before, ScaleOutput(1.01).run(copy.deepcopy(gm), ctx)(*ctx.diff_inputs))
    adopted = []

    class Spy(NumericDiff):
        def run_after_pass(self, p, gm, ctx, record):
            adopted.append(p.name)
            super().run_after_pass(p, gm, ctx, record)

    with pytest.raises(PassError) as info:
        PassManager([Noop("a"), ScaleOutput(1.01)], [Spy()]).run(gm, ctx)
    message = str(info.value)
    assert "pass 'scale_output' is declared neutral but changed the model output" in message
    assert f"{expected:.1f} dB QSNR against the graph before it" in message and 30 < expected < 100
    assert info.value.pass_name == "scale_output" and info.value.before == ("a",)
    assert adopted == ["a"]  # the diff never saw (nor adopted) the faulty pass's values
    assert [p.name for p in ctx.report.passes] == ["a"]


def test_neutral_pass_within_rounding_passes(setup):
    gm, ctx = setup
    out = PassManager([ScaleOutput(1.0 + 2**-20)], [NumericDiff()]).run(gm, ctx)  # about 120 dB
    assert ctx.report.passes[-1].output_qsnr_db > 100.0
    assert out is gm


def test_neutral_check_costs_one_forward_per_neutral_pass(setup):
    gm, ctx = setup
    calls = []
    gm.register_forward_pre_hook(lambda module, args: calls.append(1))
    PassManager([Noop("a"), Noop("b"), Noop("c")], [NumericDiff()]).run(gm, ctx)
    assert len(calls) == 4  # one before the first, one after each (NumericDiff's capture reused)


def test_pass_not_declared_neutral_may_change_the_output(setup):
    gm, ctx = setup

    class Quantizes(ScaleOutput):
        neutral = False

    PassManager([Quantizes(2.0)]).run(gm, ctx)
    assert ctx.report.passes[-1].name == "scale_output"


# --------------------------------------------------------------------- notes
def test_notes_land_in_the_pass_record(setup):
    gm, ctx = setup
    PassManager([Noop("a"), Noop("b")]).run(gm, ctx)
    assert ctx.report.pass_record("b").notes == ["b ran"]
    assert ctx.properties == frozenset()  # no contract: nothing established


def test_smooth_notes_reach_the_report_under_w8a8():
    from tests.tiny import compiled_tiny_vit

    _, _, qm = compiled_tiny_vit("w8a8")
    smooth = qm.report.pass_record("smooth").notes
    assert smooth and all("smoothed into" in note for note in smooth)
    assert all(note in qm.report.notes for note in smooth)
    for name in ("insert_observers", "fuse_scales"):  # every pass's notes, in pipeline order
        assert all(note in qm.report.notes for note in qm.report.pass_record(name).notes)
    order = [n for r in qm.report.passes for n in r.notes]
    assert qm.report.notes == order
