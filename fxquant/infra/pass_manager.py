"""Passes, their shared context and the manager that checks a pipeline and runs it with instruments.

Modelled on torch.fx's ``PassBase``/``PassManager`` (a pass takes a GraphModule and
returns one; checks run around it) and TVM's ``PassInstrument`` (hooks before and after
every pass: numeric diff, dumps, timing). Each pass class declares a static ``Contract``
(``fxquant.infra.contracts``) that the manager checks over the whole pipeline when it is
built; a ``neutral`` pass is held to its word on the diff inputs when it runs
(``fxquant.infra.neutrality``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch.fx as fx

from fxquant.errors import FxqError, NodeError, PassError
from fxquant.infra.contracts import NO_CONTRACT, Contract, check_order, contract_of, register_pass_class
from fxquant.infra.neutrality import NEUTRAL_MIN_DB, graph_output, output_qsnr
from fxquant.infra.records import PassRecord, Report
from fxquant.quant.qconfig import QConfig


@dataclass
class PassContext:
    """What every pass and instrument may read. Passes write their notes into ``record``
    (:meth:`note`) and what the user must see into ``report``; the manager keeps
    ``record``, ``properties`` and ``graph_output`` up to date."""

    qconfig: QConfig
    reference: fx.GraphModule  # the FP32 graph every node is compared with
    diff_inputs: tuple
    calib_data: Optional[Iterable] = None
    dump_dir: Optional[Path] = None
    report: Optional[Report] = None
    progress: bool = True
    current_node: Optional[str] = None  # set by passes so that errors can name the node
    # the record of the pass now running (a pass run by hand, outside a manager, writes into this one)
    record: PassRecord = field(default_factory=lambda: PassRecord("outside a pass manager"))
    # the graph properties (fxquant.infra.contracts.Prop) that hold after the passes run so far
    properties: frozenset = frozenset()
    # the current graph's output on diff_inputs when already computed since its last change, else None
    graph_output: Any = None
    # observers calibrated ahead of insert_observers by a pass that read the data anyway
    # (fxquant.quant.observers.EarlyStatistics, made by smooth); the manager drops them after any
    # pass other than their maker that does not declare ``keeps_statistics``
    statistics: Any = None

    def note(self, *texts: str) -> None:
        """Decisions of the running pass, for the user: they land in its record and in ``report.notes``."""
        self.record.notes.extend(texts)


class Pass:
    """One graph rewrite. ``contract``: the graph properties it requires, provides, removes
    (checked over the pipeline before anything runs). ``neutral`` passes must leave the
    model output unchanged on the diff inputs (checked after they run)."""

    name: str = "pass"
    neutral: bool = False
    contract: Contract = NO_CONTRACT
    # True: the pass changes no value an observer will read, so statistics gathered before it
    # (PassContext.statistics) still describe the graph after it
    keeps_statistics: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        register_pass_class(cls)  # so that an order error can name a provider missing from the pipeline

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise if the graph is not in the state this pass expects."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise if the pass did not leave the graph as it promises."""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class Instrument:
    """Hooks called around every pass (and once on the traced graph as pass 'trace')."""

    def run_before_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def run_after_pass(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, record: PassRecord) -> None:
        pass


class PassManager:
    """Checks the order of ``passes`` against their contracts when built (``holds``: the
    graph properties true before the first pass; a freshly traced graph has none) and runs
    them. ``holds_after``: the properties after the last pass, the ``holds`` of a pipeline
    that continues from this one."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), *, holds: Iterable = ()):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, got {names}")
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.holds = frozenset(holds)
        self.holds_after = check_order(self.passes, self.holds)

    def run(self, gm: fx.GraphModule, ctx: PassContext, after: Sequence[str] = ()) -> fx.GraphModule:
        """``after``: names of passes an earlier run already applied (for error messages)."""
        done: list[str] = list(after)
        ctx.graph_output = None  # the graph may have changed since an earlier run
        properties = self.holds
        for p in self.passes:
            record = PassRecord(p.name)
            ctx.record = record
            for inst in self.instruments:
                inst.run_before_pass(p, gm, ctx)
            ctx.current_node = None
            try:
                p.requires(gm, ctx)
                before = self._output(gm, ctx) if p.neutral and ctx.diff_inputs else None
                ctx.graph_output = None
                gm = p.run(gm, ctx)
                gm.graph.lint()
                gm.recompile()
                p.ensures(gm, ctx)
                if before is not None:
                    self._check_neutral(p, gm, ctx, before, done)
            except PassError:
                raise
            except Exception as exc:
                raise _pass_error(p, exc, ctx, done) from exc
            properties = contract_of(p).after(properties)
            ctx.properties = properties
            statistics = ctx.statistics
            if statistics is not None and statistics.made_by != p.name and not p.keeps_statistics:
                ctx.statistics = None  # the values they describe may have changed
            for inst in self.instruments:  # after the neutrality check: the diff never adopts a faulty pass's values
                inst.run_after_pass(p, gm, ctx, record)
            if ctx.report is not None:
                ctx.report.passes.append(record)
            done.append(p.name)
        return gm

    @staticmethod
    def _output(gm: fx.GraphModule, ctx: PassContext) -> Any:
        if ctx.graph_output is None:
            ctx.graph_output = graph_output(gm, tuple(ctx.diff_inputs))
        return ctx.graph_output

    @staticmethod
    def _check_neutral(p: Pass, gm: fx.GraphModule, ctx: PassContext, before: Any, done: list[str]) -> None:
        """One forward of the rewritten graph; its output must match the one before the pass."""
        after = graph_output(gm, tuple(ctx.diff_inputs))
        try:
            db = output_qsnr(before, after)
        except ValueError as exc:
            db, detail = float("-inf"), str(exc)
        else:
            detail = f"{db:.1f} dB QSNR against the graph before it on the diff inputs"
        if not db >= NEUTRAL_MIN_DB:
            raise PassError(
                f"pass '{p.name}' is declared neutral but changed the model output: {detail} "
                f"(a neutral pass keeps at least {NEUTRAL_MIN_DB:.0f} dB; passes run before it: "
                f"{', '.join(done) or 'none'})",
                pass_name=p.name,
                before=tuple(done),
            )
        ctx.graph_output = after


def _pass_error(p: Pass, exc: Exception, ctx: PassContext, done: list[str]) -> PassError:
    node = exc.node if isinstance(exc, NodeError) else (ctx.current_node or "")
    before = ", ".join(done) if done else "none"
    detail = str(exc) if isinstance(exc, FxqError) else f"{type(exc).__name__}: {exc}"
    where = f" at node '{node}'" if node and not isinstance(exc, NodeError) else ""
    return PassError(
        f"pass '{p.name}' failed{where}: {detail} (passes run before it: {before})",
        pass_name=p.name,
        node=node,
        before=tuple(done),
    )
