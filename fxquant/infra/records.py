"""The compile report: per pass, per node QSNR against FP32 (format in ARCHITECTURE.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

INF_DB = 999.0  # JSON has no infinity: identical tensors are written as this


def db_for_json(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if math.isnan(value):
        raise ValueError("a QSNR of NaN reached the report; qsnr_db must never return NaN")
    if math.isinf(value):
        return INF_DB if value > 0 else -INF_DB
    return round(float(value), 3)


def _drop_for_json(drop: dict) -> dict:
    return {**drop, "qsnr_db": db_for_json(drop["qsnr_db"]), "drop_db": db_for_json(drop.get("drop_db"))}


@dataclass
class PassRecord:
    name: str
    seconds: float = 0.0  # the pass itself (with its neutrality check), not the instruments after it
    output_qsnr_db: Optional[float] = None
    nodes: list[dict] = field(default_factory=list)
    first_drop: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    diff_seconds: float = 0.0  # the numeric diff after this pass (0 when it did not run)
    dump_seconds: float = 0.0  # writing this pass's graph dump (0 without a dump dir)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "name": self.name,
            "seconds": round(self.seconds, 4),
            "diff_seconds": round(self.diff_seconds, 4),
            "dump_seconds": round(self.dump_seconds, 4),
            "output_qsnr_db": db_for_json(self.output_qsnr_db),
            "nodes": [
                {**n, "qsnr_db": db_for_json(n["qsnr_db"]), "input_qsnr_db": db_for_json(n.get("input_qsnr_db"))}
                for n in self.nodes
            ],
        }
        if self.first_drop is not None:
            out["first_drop"] = _drop_for_json(self.first_drop)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def node(self, name: str) -> dict:
        for entry in self.nodes:
            if entry["node"] == name:
                return entry
        raise KeyError(f"no node '{name}' in the diff of pass '{self.name}'")


@dataclass
class Report:
    model: str
    qconfig: str
    backend: str
    passes: list[PassRecord] = field(default_factory=list)
    float_points: list[str] = field(default_factory=list)  # annotated ops left in float, and why
    notes: list[str] = field(default_factory=list)  # what passes decided (shared scales, folds)
    keep_float: list[str] = field(default_factory=list)  # points left in float by compile(keep_float=K)
    warnings: list[str] = field(default_factory=list)  # what a user must read first (e.g. most weights float)
    weight_coverage: Optional[dict] = None  # quantized/total Linear/Conv weight elements, the float ones and why
    weight_bytes: Optional[dict] = None  # integer graphs: weight bytes vs FP32 (fxquant.analysis.weight_bytes)

    def pass_record(self, name: str) -> PassRecord:
        for record in self.passes:
            if record.name == name:
                return record
        raise KeyError(f"no pass '{name}' in the report; passes: {[p.name for p in self.passes]}")

    @property
    def final(self) -> PassRecord:
        return self.passes[-1]

    def quant_points(self, pass_name: Optional[str] = None) -> list[dict]:
        """Nodes of a pass (default: the last) that carry a quantization group."""
        record = self.pass_record(pass_name) if pass_name else self.final
        return [n for n in record.nodes if n.get("group")]

    def worst_nodes(self, k: int = 10, pass_name: Optional[str] = None) -> list[dict]:
        return sorted(self.quant_points(pass_name), key=lambda n: n["qsnr_db"])[:k]

    def first_drop(self) -> Optional[dict]:
        """The final graph's first large drop, with ``pass``: the pass that introduced it.

        That is the earliest pass whose own diff already shows a large drop at the same
        node (a later pass may only carry it along), else the earliest pass with any drop.
        """
        if not self.passes or self.final.first_drop is None:
            return None
        drop = self.final.first_drop
        with_drop = [p for p in self.passes if p.first_drop is not None]
        same = [p for p in with_drop if p.first_drop["node"] == drop["node"]]
        return {**drop, "pass": (same or with_drop)[0].name}

    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "qconfig": self.qconfig,
            "backend": self.backend,
            "passes": [p.to_dict() for p in self.passes],
            "float_points": list(self.float_points),
            "notes": list(self.notes),
            "keep_float": list(self.keep_float),
            "warnings": list(self.warnings),
        }
        if self.weight_coverage is not None:
            out["weight_coverage"] = self.weight_coverage
        if self.weight_bytes is not None:
            out["weight_bytes"] = self.weight_bytes
        drop = self.first_drop()
        if drop is not None:
            out["first_drop"] = _drop_for_json(drop)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of :meth:`to_dict` (a report.json read back; +-999 dB become +-inf)."""

        def db(value):
            return None if value is None else (math.copysign(math.inf, value) if abs(value) >= INF_DB else value)

        passes = []
        for raw in data["passes"]:
            nodes = [
                {
                    **n,
                    "qsnr_db": db(n.get("qsnr_db")),
                    **({"input_qsnr_db": db(n["input_qsnr_db"])} if "input_qsnr_db" in n else {}),
                }
                for n in raw.get("nodes", [])
            ]
            drop = raw.get("first_drop")
            if drop is not None:
                drop = {**drop, "qsnr_db": db(drop.get("qsnr_db")), "drop_db": db(drop.get("drop_db"))}
            passes.append(
                PassRecord(
                    raw["name"],
                    raw.get("seconds", 0.0),
                    db(raw.get("output_qsnr_db")),
                    nodes,
                    drop,
                    list(raw.get("notes", [])),
                    raw.get("diff_seconds", 0.0),
                    raw.get("dump_seconds", 0.0),
                )
            )
        return cls(
            data["model"],
            data["qconfig"],
            data["backend"],
            passes,
            list(data.get("float_points", [])),
            list(data.get("notes", [])),
            list(data.get("keep_float", [])),
            list(data.get("warnings", [])),
            data.get("weight_coverage"),
            data.get("weight_bytes"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def table(self, worst: int = 8) -> str:
        lines = [f"fxquant report: model={self.model} qconfig={self.qconfig} backend={self.backend}"]
        lines += self.warnings  # before anything else: the user may be holding a mostly float model
        line = self.first_drop_line()
        if line:  # the first thing a reader needs, before the table
            lines.append(line)
        lines.append(f"{'#':>2}  {'pass':<20} {'seconds':>8} {'diff s':>7} {'output QSNR dB':>15} {'points':>7}")
        for i, record in enumerate(self.passes):
            points = sum(1 for n in record.nodes if n.get("group"))
            lines.append(
                f"{i:>2}  {record.name:<20} {record.seconds:>8.3f} {record.diff_seconds:>7.3f} "
                f"{format_db(record.output_qsnr_db):>15} {points:>7}"
            )
        lines.append(self.timing_line())
        if self.passes and worst:
            lines.append(f"worst quantization points after '{self.final.name}':")
            for n in self.worst_nodes(worst):
                lines.append(f"  {format_db(n['qsnr_db']):>8} dB  {n['group']:<22} {n['node']:<40} {n['module']}")
        return "\n".join(lines)

    def timing_line(self) -> str:
        """Where the compile time went: the passes, the numeric diff, the graph dumps."""
        passes = sum(r.seconds for r in self.passes)
        diff = sum(r.diff_seconds for r in self.passes)
        dump = sum(r.dump_seconds for r in self.passes)
        return f"time: passes {passes:.2f} s, numeric diff {diff:.2f} s, graph dumps {dump:.2f} s"

    def first_drop_line(self) -> Optional[str]:
        drop = self.first_drop()
        if drop is None:
            return None
        return (
            f"first large drop: {drop['node']} ({drop['group'] or drop['module']}) "
            f"{format_db(drop['qsnr_db'])} dB, {drop['drop_db']:.1f} dB below its inputs, "
            f"introduced by pass '{drop['pass']}'"
        )

    def __str__(self) -> str:
        return self.table()


def format_db(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2f}"
