"""lower_log_int_softmax: softmax + its log2 point become one Log-Int-Softmax (LIS) node.

Runs after lower_fake_quant. Where the ``intSoft`` point uses ``quantization_method: log2``
and the softmax input is the quantized scores (``attn_kv_out``), possibly plus a bias or a
mask (Swin's relative position bias), the float softmax and the log2 fake-quant after it
are replaced by :class:`fxquant.runtime.log_int_softmax.LogIntSoftmax`, which computes the log2
codes from the integer scores (integer exp, no division, see that module). Where the
scores are not quantized, the float softmax followed by the log2 quantizer stays, and the
report's notes say so.

The other log bases (``log_sqrt2``, and ``log_adaptive`` once calibration chose its base,
``fxquant.quant.log_quantizers``) become a
:class:`fxquant.runtime.log_base_softmax.LogBaseSoftmax` the same way: the same integer exp,
codes of base ``2**(p/k)`` by integer comparisons. For ``log_adaptive`` the base is chosen
here, per point, as AdaLog scores a base: by the attn@V output it gives on the calibration
data (scores and V as the fake-quant graph computes them, the first 16 images), against the
float softmax of the same scores; the candidates are fxquant.quant.log_quantizers'
``CANDIDATE_STEPS``. (Calibration's own choice, from the probabilities alone, is what a point
keeps where its scores are not quantized.)
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.graph_utils import remove_dead_nodes
from fxquant.ir.meta import POINT, ROLE, copy_provenance
from fxquant.ir.patterns import (
    is_matmul,
    is_pass_through_module,
    is_scale_transparent,
    is_softmax,
    single_user,
    softmax_dim,
    submodule,
)
from fxquant.quant import distributed
from fxquant.quant.calib_data import as_batches, iter_batches
from fxquant.quant.log_quantizers import CANDIDATE_STEPS, log_step, method_for_step
from fxquant.runtime.fake_quant import FakeQuantize
from fxquant.runtime.log_base_softmax import LogBaseSoftmax, attention_output_errors
from fxquant.runtime.log_int_softmax import LogIntSoftmax

_ADDS = (operator.add, torch.add)


def _is_add(node: fx.Node) -> bool:
    # timm >= 1.0.20 adds the attention mask through a helper that returns x when mask is None
    return node.op == "call_function" and (
        node.target in _ADDS or getattr(node.target, "__name__", "") == "maybe_add_mask"
    )


def _scores_point(gm: fx.GraphModule, node: fx.Node) -> Optional[FakeQuantize]:
    """The scores' FakeQuantize that ``node`` (the softmax input) derives from by adds of
    biases/masks and views only; None when anything else lies between."""
    while isinstance(node, fx.Node):
        module = submodule(gm, node)
        if isinstance(module, FakeQuantize):
            return module if module.point.group == "attn_kv_out" and module.method == "uniform" else None
        if _is_add(node) or is_scale_transparent(gm, node):
            node = node.args[0]
            continue
        return None
    return None


def _scores_scale(scores: FakeQuantize) -> torch.Tensor:
    qp = scores.qparams
    return qp.broadcast_scale(4 if qp.per_channel else 0) * scores.post_scale


def _attention_values(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """V of the attn@V that reads the probabilities ``node`` (through pass-through modules)."""
    while (user := single_user(node)) is not None and is_pass_through_module(gm, user):
        node = user
    return user.args[1] if user is not None and is_matmul(user) and user.args[0] is node else None


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of ``names`` only."""

    def __init__(self, gm: fx.GraphModule, names: set):
        super().__init__(gm)
        self.names, self.values = names, {name: [] for name in names}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name].append(value.detach())
        return value


_SEARCH_SAMPLES = 16  # calibration images the adaptive base is scored on (attention rows: 16 x heads x N)


@torch.no_grad()
def _adaptive_steps(gm: fx.GraphModule, ctx: PassContext, adaptive: list) -> dict:
    """``log_adaptive`` points: the candidate base of least attn@V output error on the
    calibration data (scores and V as the fake-quant graph computes them), per point."""
    if not adaptive:
        return {}
    if ctx.calib_data is None:
        ctx.note("log_adaptive: no calib_data in this pass; the bases chosen from the probabilities alone are kept")
        return {}
    targets = {}
    for _softmax, node, fq, scores, dim in adaptive:
        v = _attention_values(gm, node)
        if v is None:
            ctx.note(f"{node.name} (intSoft): no attn@V reads the probabilities; the base from calibration kept")
            continue
        targets[node.name] = (node.args[0].args[0], v, fq, scores, dim)
    recorder, samples = _Recorder(gm, {n.name for t in targets.values() for n in t[:2]}), 0
    for batch in iter_batches(as_batches(ctx.calib_data)):
        recorder.run(batch)
        samples += batch.shape[0]
        if samples >= _SEARCH_SAMPLES:
            break
    steps = {}
    for name, (scores_node, v_node, fq, scores, dim) in targets.items():
        spec, errors = fq.point.spec, dict.fromkeys(CANDIDATE_STEPS, 0.0)
        renormalize = bool(spec.option("lis_renormalize", True))
        for s, v in zip(recorder.values[scores_node.name], recorder.values[v_node.name]):
            if dim not in (-1, s.dim() - 1) or s.shape[-1] != v.shape[-2]:
                break
            got = attention_output_errors(s, v, _scores_scale(scores), spec.bits, renormalize, CANDIDATE_STEPS)
            errors = {k: errors[k] + got[k] for k in errors}
        else:
            summed = distributed.reduce_sums({str(k): v for k, v in errors.items()})  # every rank alike
            errors = {k: summed[str(k)] for k in CANDIDATE_STEPS}
            steps[name] = min(CANDIDATE_STEPS, key=lambda step: (errors[step], -step))
            ctx.note(
                f"{name} (intSoft): log_adaptive chose {method_for_step(steps[name])} on attn@V's output "
                f"(its error {errors[steps[name]] / max(errors[1], 1e-30):.3f} x log2's)"
            )
            continue
        ctx.note(f"{name} (intSoft): the softmax is not along attn@V's summed axis; the base from calibration kept")
    return steps


class LowerLogIntSoftmax(Pass):
    name = "lower_log_int_softmax"
    contract = Contract(requires={Prop.FAKE_QUANT}, provides={Prop.LIS_LOWERED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        found = []
        for node in list(gm.graph.nodes):
            fq = submodule(gm, node)
            if not (isinstance(fq, FakeQuantize) and fq.point.group == "intSoft" and fq.method != "uniform"):
                continue
            ctx.current_node = node.name
            softmax = node.args[0]
            if not (isinstance(softmax, fx.Node) and is_softmax(gm, softmax) and len(softmax.users) == 1):
                ctx.note(f"{node.name} (intSoft): not right after a softmax; plain {fq.method} quantizer kept")
                continue
            scores = _scores_point(gm, softmax.args[0])
            dim = softmax_dim(gm, softmax)
            if scores is None or dim is None or fq.post_scale != 1.0:
                ctx.note(
                    f"{node.name} (intSoft): the softmax input is not the quantized scores; float softmax "
                    f"with a {fq.method} quantizer kept (quantize attn_kv_out to get the integer LIS)"
                )
                continue
            found.append((softmax, node, fq, scores, dim))
        steps = _adaptive_steps(gm, ctx, [f for f in found if f[2].point.spec.method == "log_adaptive"])
        for softmax, node, fq, scores, dim in found:
            ctx.current_node = node.name
            self._replace(gm, softmax, node, fq, scores, dim, steps.get(node.name))
        remove_dead_nodes(gm.graph)
        gm.delete_all_unused_submodules()
        return gm

    @staticmethod
    def _replace(
        gm, softmax: fx.Node, fq_node: fx.Node, fq: FakeQuantize, scores: FakeQuantize, dim: int, step
    ) -> None:
        scale = _scores_scale(scores)
        if fq.point.spec.signed:
            raise ValueError(
                f"{fq_node.name}: softmax outputs are non-negative; the intSoft {fq.method} point must be "
                "unsigned (signed: false)"
            )
        target = str(fq_node.target)
        bits, renormalize = fq.point.spec.bits, bool(fq.point.spec.option("lis_renormalize", True))
        step = log_step(fq.method) if step is None else step  # log_adaptive: the base chosen on attn@V
        if step == 1:
            module = LogIntSoftmax(scale, bits, dim, point=fq.point, renormalize=renormalize)
        else:  # log_sqrt2 and the other bases
            module = LogBaseSoftmax(scale, bits, step, dim, point=fq.point, renormalize=renormalize)
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(fq_node):
            lis = gm.graph.call_module(target, (softmax.args[0],))
        copy_provenance(fq_node, lis)
        lis.meta[POINT] = fq.point
        if ROLE in fq_node.meta:
            lis.meta[ROLE] = fq_node.meta[ROLE]
        fq_node.replace_all_uses_with(lis)
        gm.graph.erase_node(fq_node)
        gm.graph.erase_node(softmax)
