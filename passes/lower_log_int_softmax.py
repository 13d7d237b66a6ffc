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
codes of base ``2**(p/k)`` by integer comparisons.
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
from fxquant.ir.patterns import is_scale_transparent, is_softmax, softmax_dim, submodule
from fxquant.quant.log_quantizers import log_step
from fxquant.runtime.fake_quant import FakeQuantize
from fxquant.runtime.log_base_softmax import LogBaseSoftmax
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


class LowerLogIntSoftmax(Pass):
    name = "lower_log_int_softmax"
    contract = Contract(requires={Prop.FAKE_QUANT}, provides={Prop.LIS_LOWERED})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
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
            self._replace(gm, softmax, node, fq, scores, dim)
        remove_dead_nodes(gm.graph)
        gm.delete_all_unused_submodules()
        return gm

    @staticmethod
    def _replace(gm, softmax: fx.Node, fq_node: fx.Node, fq: FakeQuantize, scores: FakeQuantize, dim: int) -> None:
        qp = scores.qparams
        scale = qp.broadcast_scale(4 if qp.per_channel else 0) * scores.post_scale
        if fq.point.spec.signed:
            raise ValueError(
                f"{fq_node.name}: softmax outputs are non-negative; the intSoft {fq.method} point must be "
                "unsigned (signed: false)"
            )
        target = str(fq_node.target)
        bits, renormalize = fq.point.spec.bits, bool(fq.point.spec.option("lis_renormalize", True))
        if fq.method == "log2":
            module = LogIntSoftmax(scale, bits, dim, point=fq.point, renormalize=renormalize)
        else:  # log_sqrt2, or the base log_adaptive chose
            module = LogBaseSoftmax(scale, bits, log_step(fq.method), dim, point=fq.point, renormalize=renormalize)
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
