"""Passes, their shared context and the manager that runs them with instruments.

Modelled on torch.fx's ``PassBase``/``PassManager`` (a pass takes a GraphModule and
returns one; checks run around it) and TVM's ``PassInstrument`` (hooks before and after
every pass: numeric diff, dumps, timing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch.fx as fx

from fxquant.errors import FxqError, NodeError, PassError
from fxquant.infra.records import PassRecord, Report
from fxquant.quant.qconfig import QConfig


@dataclass
class PassContext:
    """What every pass and instrument may read; passes write only ``state`` and ``report``."""

    qconfig: QConfig
    reference: fx.GraphModule  # the FP32 graph every node is compared with
    diff_inputs: tuple
    calib_data: Optional[Iterable] = None
    dump_dir: Optional[Path] = None
    report: Optional[Report] = None
    progress: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    current_node: Optional[str] = None  # set by passes so that errors can name the node


class Pass:
    """One graph rewrite. ``neutral`` passes must leave the FP32 output unchanged."""

    name: str = "pass"
    neutral: bool = False

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
    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, got {names}")
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, gm: fx.GraphModule, ctx: PassContext, after: Sequence[str] = ()) -> fx.GraphModule:
        """``after``: names of passes an earlier run already applied (for error messages)."""
        done: list[str] = list(after)
        for p in self.passes:
            record = PassRecord(p.name)
            for inst in self.instruments:
                inst.run_before_pass(p, gm, ctx)
            ctx.current_node = None
            try:
                p.requires(gm, ctx)
                gm = p.run(gm, ctx)
                gm.graph.lint()
                gm.recompile()
                p.ensures(gm, ctx)
            except PassError:
                raise
            except Exception as exc:
                raise _pass_error(p, exc, ctx, done) from exc
            for inst in self.instruments:
                inst.run_after_pass(p, gm, ctx, record)
            if ctx.report is not None:
                ctx.report.passes.append(record)
            done.append(p.name)
        return gm


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
