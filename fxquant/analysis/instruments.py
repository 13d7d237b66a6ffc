"""Instruments run after every pass: Timing, NumericDiff (QSNR vs FP32) and GraphDump."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import networkx as nx
import torch.fx as fx

from fxquant.analysis.numeric_diff import adopt_new_origins, capture_values, compare_graph, new_origins
from fxquant.infra.pass_manager import Instrument, Pass, PassContext
from fxquant.infra.records import PassRecord, db_for_json
from fxquant.ir.meta import MODULE, ORIGIN, POINT, WEIGHT


class Timing(Instrument):
    def run_before_pass(self, p, gm, ctx):
        self._start = time.perf_counter()

    def run_after_pass(self, p, gm, ctx, record):
        record.seconds = time.perf_counter() - self._start


class NumericDiff(Instrument):
    """Runs the graph on the diff inputs and records per-node QSNR against the reference.

    ``only_after``: the name of the one pass after which to diff (``numeric_diff="final"``:
    the last pass of the pipeline); ``None`` diffs after every pass. A node whose value and
    reference are the same as after the previous diff keeps its QSNR without recomputing it
    (most passes change a few nodes). ``record.diff_seconds``: this instrument's own time."""

    def __init__(self, only_after: Optional[str] = None) -> None:
        self.only_after = only_after
        self._ref_values = None
        self._ref_output = None
        self._cache: dict = {}

    def _reference(self, ctx: PassContext):
        if self._ref_values is None:
            self._ref_values = capture_values(ctx.reference, ctx.diff_inputs)
            out_node = next(n for n in ctx.reference.graph.nodes if n.op == "output")
            self._ref_output = self._ref_values[out_node.name]
        return self._ref_values, self._ref_output

    def run_after_pass(self, p, gm, ctx, record: PassRecord):
        if self.only_after is not None and p.name != self.only_after:
            if p.neutral:  # what it created joins the reference, as it does when every pass is diffed
                start = time.perf_counter()
                if self._adopt(gm, ctx):
                    record.diff_seconds = time.perf_counter() - start
            return
        start = time.perf_counter()
        ref_values, ref_output = self._reference(ctx)
        values = capture_values(gm, ctx.diff_inputs)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        ctx.graph_output = values[out_node.name]  # a neutral pass next compares its output with this one
        # the manager ran this hook only after checking a neutral pass's output: its new nodes may be adopted
        nodes, out_db, drop = compare_graph(
            gm, ctx.diff_inputs, ref_values, ref_output, adopt_new=p.neutral, values=values, cache=self._cache
        )
        record.nodes, record.output_qsnr_db, record.first_drop = nodes, out_db, drop
        record.diff_seconds = time.perf_counter() - start

    def _adopt(self, gm, ctx: PassContext) -> bool:
        """A neutral pass's new origins, with their values on the diff inputs, join the reference
        (one run of the graph, only when it has such nodes: returns whether it had)."""
        ref_values, _ = self._reference(ctx)
        if not new_origins(gm, ref_values):
            return False
        values = capture_values(gm, ctx.diff_inputs)
        ctx.graph_output = values[next(n for n in gm.graph.nodes if n.op == "output").name]
        adopt_new_origins(gm, ref_values, values)
        return True


def graph_to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        point = node.meta.get(POINT) or node.meta.get(WEIGHT)
        g.add_node(
            node.name,
            op=node.op,
            target=_target_name(node),
            module=node.meta.get(MODULE, ""),
            origin=node.meta.get(ORIGIN, ""),
            group=point.label if point else "",
        )
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name)
    return g


def _target_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if callable(target) else str(target)


def _dot(g: nx.DiGraph, qsnr: dict[str, float]) -> str:
    lines = ["digraph fxquant {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for name, data in g.nodes(data=True):
        label = f"{name}\\n{data['target']}" + (f"\\n[{data['group']}]" if data["group"] else "")
        if name in qsnr:
            label += f"\\n{qsnr[name]:.1f} dB"
        style = ', style=filled, fillcolor="#ffe9a8"' if data["group"] else ""
        lines.append(f'  "{name}" [label="{label}"{style}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in g.edges()]
    lines.append("}")
    return "\n".join(lines) + "\n"


class GraphDump(Instrument):
    """Writes ``NN_<pass>.py`` (readable code), ``.dot`` and ``.json`` into the dump dir."""

    def __init__(self, dump_dir: str | Path):
        self.dump_dir = Path(dump_dir)
        self.count = 0

    def dump(self, name: str, gm: fx.GraphModule, record: PassRecord | None = None) -> Path:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = self.dump_dir / f"{self.count:02d}_{name}"
        self.count += 1
        qsnr = {n["node"]: n["qsnr_db"] for n in record.nodes} if record else {}
        header = f"# fxquant graph after pass '{name}'\n"
        if record is not None and record.output_qsnr_db is not None:
            header += f"# output QSNR vs FP32: {db_for_json(record.output_qsnr_db)} dB\n"
        stem.with_suffix(".py").write_text(header + gm.code)
        g = graph_to_networkx(gm)
        for node_name, db in qsnr.items():
            g.nodes[node_name]["qsnr_db"] = db_for_json(db)
        stem.with_suffix(".dot").write_text(_dot(g, qsnr))
        data = nx.node_link_data(g, edges="edges")
        stem.with_suffix(".json").write_text(json.dumps({"pass": name, **data}, indent=1, allow_nan=False))
        return stem

    def run_after_pass(self, p: Pass, gm, ctx, record):
        start = time.perf_counter()
        self.dump(p.name, gm, record)
        record.dump_seconds = time.perf_counter() - start
