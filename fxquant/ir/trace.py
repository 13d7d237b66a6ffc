"""Turn a timm ViT-family model into a torch.fx GraphModule with explicit attention.

The user's model is never touched: tracing works on a deep copy. timm's fused attention
(``F.scaled_dot_product_attention``) is switched off on the copy so that q@kT, the scale,
softmax and @v appear as separate nodes; anything still fused is rewritten by the
``decompose_attention`` pass.
"""

from __future__ import annotations

import copy
import inspect
import operator
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxquant.errors import FxqError, TraceError
from fxquant.ir.capture import flatten_tensors
from fxquant.ir.concrete_shapes import batch_example, with_values
from fxquant.ir.hf_trace import hf_image_spec, hf_trace, is_hf_model
from fxquant.ir.meta import stamp_origins

SPECIALIZED_TOLERANCE = 1e-3  # a size-specialised trace must agree with the model to float rounding

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


@dataclass(frozen=True)
class ImageInput:
    """What a model's patch embedding accepts: ``channels``, and either exactly ``size``
    (H, W) or any size divisible by ``multiple_of`` (timm ``strict_img_size=False``)."""

    module: str  # dotted path of the patch embedding
    channels: Optional[int]
    size: Optional[tuple[int, int]]
    multiple_of: Optional[tuple[int, int]] = None


def image_input(model: nn.Module) -> Optional[ImageInput]:
    """The input the first timm-style patch embedding (``img_size``, ``strict_img_size``,
    ``proj``) of ``model`` accepts (a transformers model: what its config asks for), or None
    when there is none to read it from."""
    if is_hf_model(model):
        channels, size = hf_image_spec(model)
        projection = "embeddings.patch_embeddings"
        owner = next((p for p, _ in model.named_modules() if p.endswith(projection)), "")
        return ImageInput(owner, channels, size) if channels is not None or size is not None else None
    for path, module in model.named_modules():
        if not all(hasattr(module, a) for a in ("img_size", "strict_img_size", "patch_size", "proj")):
            continue
        proj = module.proj
        channels = proj.in_channels if isinstance(proj, nn.Conv2d) else None
        size = tuple(module.img_size) if module.img_size is not None else None
        if size is not None and module.strict_img_size:
            return ImageInput(path, channels, size)
        if size is not None and not getattr(module, "dynamic_img_pad", False):
            return ImageInput(path, channels, None, tuple(module.patch_size))
        return ImageInput(path, channels, None)
    return None


def check_image_input(model: nn.Module, batch: torch.Tensor, what: str) -> None:
    """Refuse ``batch`` (described by ``what``, e.g. "calib_data batch 0") when the model's
    patch embedding would reject it, naming the expected and the given size.

    Checked before tracing: once traced, timm's own assertion can only print the tracing
    proxy (``Input height (Proxy(getitem_2))``), not the size."""
    spec = image_input(model)
    if spec is None or batch.dim() != 4:
        return
    channels, height, width = batch.shape[1:]
    owner = f"{spec.module or 'the model'} ({type(model.get_submodule(spec.module)).__name__})"
    if spec.channels is not None and channels != spec.channels:
        raise FxqError(
            f"{what} holds {channels}-channel images (shape {tuple(batch.shape)}) but the model's "
            f"patch embedding {owner} expects {spec.channels} channels (N, {spec.channels}, H, W)"
        )
    if spec.size is not None and (height, width) != spec.size:
        raise FxqError(
            f"{what} holds images of size {height}x{width} (H x W, shape {tuple(batch.shape)}) but the "
            f"model expects {spec.size[0]}x{spec.size[1]} ({owner}, img_size={spec.size}); resize the "
            f"images to {spec.size[0]}x{spec.size[1]} or create the model with img_size=({height}, {width})"
        )
    if spec.multiple_of is not None and (height % spec.multiple_of[0] or width % spec.multiple_of[1]):
        raise FxqError(
            f"{what} holds images of size {height}x{width} but {owner} needs a height and width "
            f"divisible by the patch size {spec.multiple_of[0]}x{spec.multiple_of[1]}; resize or pad "
            "the images"
        )


_PROXY = re.compile(r"Proxy\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _describe(node: Optional[fx.Node]) -> Optional[str]:
    """``x.shape[2]`` for getitem(getattr(x, 'shape'), 2) (or x.size()[2]); None for anything else."""
    if node is None or node.op != "call_function" or node.target is not operator.getitem:
        return None
    source, index = node.args
    if not isinstance(source, fx.Node) or not isinstance(index, int):
        return None
    if source.op == "call_function" and source.target is getattr and source.args[1:] == ("shape",):
        owner = source.args[0]
    elif source.op == "call_method" and source.target == "size" and len(source.args) == 1:
        owner = source.args[0]
    else:
        return None
    return f"{owner.name}.shape[{index}]" if isinstance(owner, fx.Node) else None


def readable_assert_messages(graph: fx.Graph) -> int:
    """Replace ``Proxy(getitem_2)`` in the messages of traced ``torch._assert`` calls (their
    f-strings were formatted with tracing proxies) by what the value is, e.g. ``x.shape[2]``;
    returns how many messages changed."""
    nodes = {n.name: n for n in graph.nodes}
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch._assert or len(node.args) < 2:
            continue
        message = node.args[1]
        if not isinstance(message, str) or "Proxy(" not in message:
            continue

        def name(match: re.Match) -> str:
            return _describe(nodes.get(match.group(1))) or f"the traced value {match.group(1)}"

        node.args = (node.args[0], _PROXY.sub(name, message), *node.args[2:])
        changed += 1
    return changed


def trace(
    model: nn.Module,
    *,
    keep_fused_attention: bool = False,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Iterable = (),
    example_inputs: Optional[torch.Tensor] = None,
) -> fx.GraphModule:
    """Trace a copy of ``model`` (in eval mode) into a GraphModule.

    Every node gets ``meta["fxq.origin"]`` (its own name: this graph is the FP32 reference)
    and ``meta["fxq.module"]`` (the dotted path of the module it belongs to).

    A Hugging Face ``transformers`` model (ViT, DeiT, DINOv2, Swin) goes through
    :func:`fxquant.ir.hf_trace.hf_trace`, which runs ``example_inputs`` (an image batch; by
    default a random one at the config's image size) while tracing: its graph is specialised
    to that image size and returns the tensors of the model's ModelOutput as a dict.

    For other models ``example_inputs`` (an image batch): when symbolic tracing fails, e.g. on Python control
    flow over tensor sizes, the model is traced again with the sizes of this input
    (``fxquant.ir.concrete_shapes``): the graph then accepts that image size only, any batch
    size; ``gm.meta["fxq.specialized_input"]`` holds the (C, H, W) it was specialised to.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if is_hf_model(model):
        return hf_trace(model, example_inputs, leaves=LEAF_TYPES + tuple(leaf_modules))
    model_copy = copy.deepcopy(model).eval()
    if not keep_fused_attention:
        disable_fused_attention(model_copy)
    tracer = _VitTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model_copy, concrete_args=_concrete_defaults(model_copy))
    except TraceError:
        raise
    except Exception as exc:  # torch.fx raises many types; turn them into one clear message
        if example_inputs is not None:
            try:
                fresh = copy.deepcopy(model).eval()  # the failed trace may have left proxies on modules
                if not keep_fused_attention:
                    disable_fused_attention(fresh)
                shaped = with_values(_VitTracer, batch_example(example_inputs))(leaf_modules, autowrap_functions)
                graph = shaped.trace(fresh, concrete_args=_concrete_defaults(fresh))
                gm = _graph_module(model, fresh, graph, tuple(example_inputs.shape[1:]))
                with torch.no_grad():  # the specialised graph must compute the model, or the first error stands
                    expected = copy.deepcopy(model).eval()(example_inputs[:1])
                    error = _relative_error(expected, gm(example_inputs[:1]))
                if error <= SPECIALIZED_TOLERANCE:
                    return gm
                retry = f"its output differs from the model's by {error:.2g} (relative)"
            except Exception as again:  # not a failure that the example's sizes resolve: report the first one
                retry = f"{type(again).__name__}: {again}"
        where = tracer.failed_path or "<top level>"
        owner = model_copy.get_submodule(tracer.failed_path) if tracer.failed_path else model_copy
        raise TraceError(
            f"torch.fx could not trace module '{where}' ({type(owner).__name__}): "
            f"{type(exc).__name__}: {exc}. "
            "Data-dependent Python control flow cannot be traced: make that module a leaf "
            "(trace(..., leaf_modules=[ItsClass])) so it stays one float node, or wrap the "
            "offending function with torch.fx.wrap / autowrap_functions."
            + (f" (Traced again with the input's sizes: {retry}.)" if example_inputs is not None else "")
        ) from exc
    return _graph_module(model, model_copy, graph, None)


def _relative_error(expected, got) -> float:
    pairs = list(zip(flatten_tensors(expected), flatten_tensors(got)))
    if not pairs or any(a.shape != b.shape for a, b in pairs):
        return float("inf")
    return max(float((a - b).norm() / a.norm().clamp_min(1e-12)) for a, b in pairs)


def _graph_module(model: nn.Module, model_copy: nn.Module, graph: fx.Graph, specialized) -> fx.GraphModule:
    readable_assert_messages(graph)
    gm = fx.GraphModule(model_copy, graph, class_name=type(model).__name__ + "Traced")
    stamp_origins(gm.graph)
    gm.meta["fxq.model_name"] = type(model).__name__
    if specialized is not None:
        gm.meta["fxq.specialized_input"] = specialized
    return gm
