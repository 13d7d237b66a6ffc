"""Before/Expected graph tests, TVM relax style: the machinery shared by ``test_*_graph.py``.

A test builds a tiny hand-written module (the *Before*), brings it to the state the pass
under test expects by running the passes that come before it in the default pipeline,
runs the pass, and compares the result with a hand-written *Expected* module, traced:

* structurally (:func:`assert_same_structure`): the same nodes (op, target, args, kwargs),
  node names normalised by position, and for ``call_module`` nodes the same submodule path,
  type and ``extra_repr`` (labels, specs, code ranges);
* numerically, by the test itself: equal outputs, or within the quantization error where
  that is the point.

Every pass runs through :func:`run_pass` (one place to adapt when the pass manager changes),
and the passes that build a Before come from :func:`fxquant.pipeline.default_passes`, so
they are configured as ``fxquant.compile`` configures them.
"""

from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.pipeline import default_passes
from tests.passes.conftest import make_context, run_passes

# ------------------------------------------------------------------------- running passes


@dataclass
class Staged:
    """A graph part-way through the pipeline: its context and the passes already applied."""

    gm: fx.GraphModule
    ctx: PassContext
    done: list[str] = field(default_factory=list)


def run_pass(staged: Staged, p: Pass) -> fx.GraphModule:
    """Run the one pass ``p`` on ``staged`` (in place: its graph, context and list of applied
    passes move on) through the conftest's ``run_passes`` (contracts checked from what the
    earlier passes established, NumericDiff after the pass); returns the graph."""
    staged.gm = run_passes(staged.gm, staged.ctx, p)
    staged.done.append(p.name)
    return staged.gm


def notes_of(staged: Staged, *pass_names: str) -> list[str]:
    """The notes the passes ``pass_names`` wrote into their records (all passes when none is named)."""
    return [n for r in staged.ctx.report.passes if not pass_names or r.name in pass_names for n in r.notes]


def pipeline_pass(name: str, int_kernels: str = "portable") -> Pass:
    """The pass ``name`` as the default ``backend="int"`` pipeline configures it."""
    passes = {p.name: p for p in default_passes("int", int_kernels)}
    if name not in passes:
        raise KeyError(f"no pass {name!r} in the default int/{int_kernels} pipeline; it has {sorted(passes)}")
    return passes[name]


def stage(
    module: torch.nn.Module,
    qconfig,
    inputs: tuple,
    *,
    before: str,
    calib_data: Optional[Iterable] = None,
    int_kernels: str = "portable",
) -> Staged:
    """Trace ``module`` and run every default pipeline pass that comes before the pass
    ``before``, each through :func:`run_pass`."""
    gm = fxquant.trace(module)
    staged = Staged(gm, make_context(gm, qconfig, inputs, calib_data))
    for p in default_passes("int", int_kernels):
        if p.name == before:
            return staged
        run_pass(staged, p)
    raise KeyError(f"no pass {before!r} in the default int/{int_kernels} pipeline")


def apply(staged: Staged, name: str, int_kernels: str = "portable") -> fx.GraphModule:
    """Run the pipeline's pass ``name`` on ``staged``."""
    return run_pass(staged, pipeline_pass(name, int_kernels))


# ------------------------------------------------------------------- structural comparison
_REF = re.compile(r"'(%\d+)'")  # a node reference inside a rendered argument


def _canonical_order(graph: fx.Graph) -> list[fx.Node]:
    """Placeholders in graph order, then every node the output depends on in post-order (arguments
    left to right), then the nodes nothing reads (graph order). Independent of where a pass
    inserted a node, so a hand-written Expected need not reproduce the insertion order."""
    order: list[fx.Node] = [n for n in graph.nodes if n.op == "placeholder"]
    seen = set(order)
    output = next(n for n in graph.nodes if n.op == "output")
    stack: list[tuple[fx.Node, bool]] = [(output, False)]
    while stack:
        node, expanded = stack.pop()
        if node in seen:
            continue
        if expanded:
            seen.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        for arg in reversed(_input_nodes(node)):
            if arg not in seen:
                stack.append((arg, False))
    order.extend(n for n in graph.nodes if n not in seen)
    return order


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _value(value: Any, index: dict) -> Any:
    """``value`` with every node replaced by its position ``%i`` (hashable, comparable)."""
    if isinstance(value, fx.Node):
        return f"%{index[value]}"
    if isinstance(value, (list, tuple)):
        return type(value)(_value(v, index) for v in value)
    if isinstance(value, dict):
        return {k: _value(v, index) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_value(value.start, index), _value(value.stop, index), _value(value.step, index))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, tuple(value.flatten().tolist()))
    return value


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", repr(target))
    for namespace, prefix in ((torch, "torch"), (operator, "operator"), (F, "F")):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    return f"{getattr(target, '__module__', None) or '?'}.{getattr(target, '__qualname__', name)}"


def _module_summary(gm: fx.GraphModule, node: fx.Node) -> str:
    module = gm.get_submodule(str(node.target))
    return f"{type(module).__name__}({module.extra_repr()})"


@dataclass
class _Row:
    op: str
    target: Any
    args: Any
    kwargs: Any
    module: Optional[str]

    def same_as(self, other: "_Row") -> bool:
        return (
            self.op == other.op
            and (self.target == other.target if self.op != "placeholder" else True)
            and _same(self.args, other.args)
            and _same(self.kwargs, other.kwargs)
            and self.module == other.module
        )

    def render(self, position: int) -> str:
        target = _target_name(self.target)
        args = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        args = _REF.sub(r"\1", args)
        line = f"%{position} = {self.op}[{target}]({args})"
        return line + (f"  # {self.module}" if self.module else "")


def _rows(gm: fx.GraphModule, modules: bool) -> list[_Row]:
    order = _canonical_order(gm.graph)
    index = {node: i for i, node in enumerate(order)}
    rows = []
    for node in order:
        summary = _module_summary(gm, node) if modules and node.op == "call_module" else None
        rows.append(_Row(node.op, node.target, _value(node.args, index), _value(node.kwargs, index), summary))
    return rows


def render(gm: fx.GraphModule, modules: bool = True) -> str:
    """The graph as :func:`assert_same_structure` sees it, one node a line."""
    return "\n".join(row.render(i) for i, row in enumerate(_rows(gm, modules)))


def assert_same_structure(actual: fx.GraphModule, expected: fx.GraphModule, *, modules: bool = True) -> None:
    """Fail, naming the first differing node, unless ``actual`` and ``expected`` have the same
    nodes in the same dependency order (see ``_canonical_order``): the same op, target
    (placeholder names excepted), args and kwargs with nodes named by position, and, for a
    ``call_module`` node with ``modules``, a submodule of the same type and ``extra_repr``."""
    got, want = _rows(actual, modules), _rows(expected, modules)
    for i, (g, w) in enumerate(zip(got, want)):
        if not g.same_as(w):
            context = "\n".join(f"    {row.render(j)}" for j, row in enumerate(got[max(0, i - 3) : i], max(0, i - 3)))
            raise AssertionError(
                f"graphs differ at node %{i}:\n  actual:   {g.render(i)}\n  expected: {w.render(i)}\n"
                f"  after (both):\n{context or '    (nothing)'}\n"
                f"actual graph:\n{render(actual, modules)}"
            )
    if len(got) != len(want):
        longer, name = (got, "actual") if len(got) > len(want) else (want, "expected")
        extra = "\n".join(
            f"    {row.render(j)}" for j, row in enumerate(longer[len(got) if name == "expected" else len(want) :])
        )
        raise AssertionError(
            f"graphs differ in length: actual has {len(got)} nodes, expected {len(want)}; the {name} graph "
            f"goes on with:\n{extra}\nactual graph:\n{render(actual, modules)}"
        )


def trace_expected(module: torch.nn.Module) -> fx.GraphModule:
    """A hand-written Expected module, traced with fxquant's leaf modules plus the runtime
    modules passes insert (observers, fake-quant, integer modules), which stay one node each.
    Buffers read in ``forward`` are graph attributes (``self.mask.logical_not()`` is a node,
    not a constant computed while tracing)."""
    from fxquant.ir.trace import LEAF_TYPES
    from fxquant.runtime import fake_quant, int_attention, int_modules, log_int_softmax, onednn

    leaves = list(LEAF_TYPES)
    for namespace in (fake_quant, int_modules, int_attention, log_int_softmax, onednn):
        leaves += [v for v in vars(namespace).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)]

    class _Tracer(fx.Tracer):
        proxy_buffer_attributes = True

        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, tuple(leaves)) or super().is_leaf_module(m, qualified_name)

    module = copy.deepcopy(module).eval()
    return fx.GraphModule(module, _Tracer().trace(module), class_name=type(module).__name__ + "Expected")


def copy_submodules(holder: nn.Module, source: nn.Module, *paths: str) -> None:
    """Give ``holder`` (an Expected being built) deep copies of ``source``'s submodules at the
    same dotted ``paths``: the parts that the pass under test must leave as they are."""
    for path in paths:
        parent = holder
        *owners, leaf = path.split(".")
        for owner in owners:
            if not hasattr(parent, owner):
                parent.add_module(owner, nn.Module())
            parent = getattr(parent, owner)
        parent.add_module(leaf, copy.deepcopy(source.get_submodule(path)))


# -------------------------------------------------------------------------------- numerics


@torch.no_grad()
def outputs(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return module(*inputs)


def quant_step_close(actual: torch.Tensor, expected: torch.Tensor, steps: float, step: float) -> None:
    """Equal within ``steps`` quantization steps of size ``step`` (where rounding is the point)."""
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=steps * step)


# ------------------------------------------------------------------- tiny Before modules
# Module paths follow timm's names, so that the qconfig groups match them (passes/annotate.py):
# norm1/norm2 -> norm1/norm2, fc1/fc2 -> mlp_fc1/mlp_fc2, GELU -> mlp_gelu, attn.qkv ->
# attn_qkv, attn.proj -> attn_proj, attention's q/k/v/scores/softmax/out by role.

DIM, HIDDEN, TOKENS, HEADS = 8, 16, 4, 2


def tokens(batch: int = 2, seed: int = 0, dim: int = DIM) -> torch.Tensor:
    return torch.randn(batch, TOKENS, dim, generator=torch.Generator().manual_seed(seed))


def calib_batches(count: int = 2, dim: int = DIM) -> list[torch.Tensor]:
    return [tokens(2, seed=100 + i, dim=dim) for i in range(count)]


class Mlp(nn.Module):
    """x -> norm2 -> fc1 -> GELU -> fc2: a ViT block's MLP half (no residual)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(HIDDEN, DIM)
        with torch.no_grad():  # a LayerNorm with non-trivial gamma/beta, as after training
            self.norm2.weight.uniform_(0.5, 2.0)
            self.norm2.bias.uniform_(-0.5, 0.5)
        self.eval()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm2(x))))


class Attention(nn.Module):
    """timm's Attention with SDPA: fused qkv, heads split by reshape/permute/unbind, proj."""

    def __init__(self, dim: int = 2 * DIM, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = self.qkv(x).reshape(-1, TOKENS, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(-1, TOKENS, self.heads * self.head_dim))


class AttentionBlock(nn.Module):
    """x -> [norm1 ->] attn: the attention under the path ``attn`` (as in a timm block)."""

    def __init__(self, seed: int = 0, norm: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.norm1 = nn.LayerNorm(2 * DIM) if norm else None
        self.attn = Attention()
        self.eval()

    def forward(self, x):
        return self.attn(self.norm1(x) if self.norm1 is not None else x)


# ------------------------------------------------------------------------------ qconfigs
def act(bits: int = 8, granularity: str = "layer_wise", **extra) -> dict:
    """An unsigned (affine) min-max activation spec, as in w8a8."""
    return {"bits": bits, "signed": False, "calibration_mode": granularity, "observer_type": "MinmaxObserver", **extra}


def weight(bits: int = 8) -> dict:
    return {"bits": bits, "signed": True, "calibration_mode": "channel_wise", "observer_type": "MinmaxObserver"}


def w8a8_minmax(**extra) -> dict:
    """w8a8's points with min-max observers: int8 per-channel weights, every GEMM input 8-bit
    affine per tensor, Q/K/V and the scores per head; softmax, residuals, outputs in float."""
    config: dict = {"name": "w8a8_minmax"}
    config.update({g: {"weight": weight()} for g in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")})
    config.update({g: act() for g in ("norm1", "norm2", "attn_v_out", "mlp_gelu")})
    config.update(
        {g: act(granularity="head_wise") for g in ("attn_q_out", "attn_k_out", "attn_v_input", "attn_kv_out")}
    )
    config.update(extra)
    return config


def nonfinite_guard(out, *checked):
    """What ``lower_integer``'s non-finite guard adds (``fxquant.lowering.nonfinite``), written
    for an Expected ``forward`` on (B, N, C) tensors: each ``checked`` tensor's per-sample max
    and min, ``-|sum(max * 0 + min * 0)|`` (-0.0, or NaN for a sample holding a NaN or an inf)
    added to ``out``."""
    highs = [torch.amax(t, dim=(1, 2)) for t in checked]
    lows = [torch.amin(t, dim=(1, 2)) for t in checked]
    zeros = torch.add(torch.mul(torch.stack(highs), 0), torch.mul(torch.stack(lows), 0))
    flags = torch.neg(torch.abs(torch.sum(zeros, dim=0)))
    return torch.add(out, torch.reshape(flags, (-1, 1, 1)))
