"""Turn a timm ViT-family model into a torch.fx GraphModule with explicit attention.

The user's model is never touched: tracing works on a deep copy. timm's fused attention
(``F.scaled_dot_product_attention``) is switched off on the copy so that q@kT, the scale,
softmax and @v appear as separate nodes; anything still fused is rewritten by the
``decompose_attention`` pass.
"""
from __future__ import annotations

import copy
import inspect
from typing import Iterable, Sequence

import torch.fx as fx
from torch import nn

from .errors import TraceError
from .meta import stamp_origins

# Modules that stay one node: the ops fxquant quantizes or treats as a unit.
LEAF_TYPES: tuple[type, ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.LayerNorm,
    nn.GELU,
    nn.Dropout,
    nn.Identity,
    nn.Softmax,
)


class _VitTracer(fx.Tracer):
    def __init__(self, extra_leaves: Sequence[type] = (), autowrap_functions: Iterable = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaves = LEAF_TYPES + tuple(extra_leaves)
        self.path_stack: list[str] = []
        self.failed_path: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the stack unwinds before trace() sees the error: remember where it started
            if self.failed_path is None:
                self.failed_path = path
            raise
        finally:
            self.path_stack.pop()


def _concrete_defaults(model: nn.Module) -> dict:
    """Fix every forward argument after the first to its default (e.g. attn_mask=None)."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TraceError(
                f"{type(model).__name__}.forward has a second required argument '{p.name}'; "
                "fxquant traces models that take one image tensor. Wrap the model in a module "
                "whose forward(x) supplies the other arguments."
            )
        concrete[p.name] = p.default
    return concrete


def disable_fused_attention(model: nn.Module) -> int:
    """Switch timm's fused SDPA off on every module that has the flag; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            count += 1
    return count


def trace(
    model: nn.Module,
    *,
    keep_fused_attention: bool = False,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Iterable = (),
) -> fx.GraphModule:
    """Trace a copy of ``model`` (in eval mode) into a GraphModule.

    Every node gets ``meta["fxq.origin"]`` (its own name: this graph is the FP32 reference)
    and ``meta["fxq.module"]`` (the dotted path of the module it belongs to).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model_copy = copy.deepcopy(model).eval()
    if not keep_fused_attention:
        disable_fused_attention(model_copy)
    tracer = _VitTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model_copy, concrete_args=_concrete_defaults(model_copy))
    except TraceError:
        raise
    except Exception as exc:  # torch.fx raises many types; turn them into one clear message
        where = tracer.failed_path or "<top level>"
        owner = model_copy.get_submodule(tracer.failed_path) if tracer.failed_path else model_copy
        raise TraceError(
            f"torch.fx could not trace module '{where}' ({type(owner).__name__}): "
            f"{type(exc).__name__}: {exc}. "
            "Data-dependent Python control flow cannot be traced: make that module a leaf "
            "(trace(..., leaf_modules=[ItsClass])) so it stays one float node, or wrap the "
            "offending function with torch.fx.wrap / autowrap_functions."
        ) from exc
    gm = fx.GraphModule(model_copy, graph, class_name=type(model).__name__ + "Traced")
    stamp_origins(gm.graph)
    gm.meta["fxq.model_name"] = type(model).__name__
    return gm
