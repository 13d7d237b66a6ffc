"""Tracing Hugging Face ``transformers`` vision models (ViT, DeiT, DINOv2, Swin) into the same
module-level torch.fx graph as a timm ViT.

transformers 5 ships no fx tracer, and plain ``torch.fx`` stops on Python code that reads
shapes (``batch, channels, h, w = x.shape``, ``if height != self.image_size[0]``,
Swin's window and padding arithmetic) and on the ``*args`` wrappers of its decorators.
This tracer runs the model on an example batch *while* tracing: every proxy carries its
concrete value (``node.meta['fxq.example']``), so Python control flow on shapes takes the
branch the real input takes, while the shapes themselves stay graph values (the batch
size stays free; the image size is the traced one, checked by an assert node).
Control flow on tensor *values* (``if x.max() > 0``) is refused: it is data-dependent.

Why this and not ``torch.export``: export produces an ATen graph (``aten.linear``,
``aten.bmm`` of expanded views, lifted parameters), while every fxquant pass is written
against torch-level nodes (``nn.Linear``/``nn.LayerNorm`` modules, ``matmul``,
``softmax``); lowering ATen back to modules would be a second, lossy compiler. A tracer
that knows transformers' modules gives the timm vocabulary directly.

What the tracer fixes on a deep copy of the model (the user's model is never touched):
eval mode; ``return_dict=True``, ``output_attentions=False``, ``output_hidden_states=False``;
the attention implementation set to ``sdpa`` (eager and sdpa compute the same attention;
the ``decompose_attention`` pass turns SDPA into timm's q*s @ kT, softmax, @v); the traced
forward takes ``pixel_values`` only and returns the tensors of the model's ``ModelOutput``
as a dict (``logits``, ``last_hidden_state``, ``pooler_output``, ...).

transformers itself is never imported here: a model is recognised by its class's module.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from fxquant.errors import TraceError
from fxquant.ir.hf_fold import drop_noop_reshapes, fold_constants
from fxquant.ir.hf_names import HF_FAMILY_META
from fxquant.ir.meta import stamp_origins

# family -> the model classes fxquant traces and maps onto its groups (tests/test_hf_models.py)
SUPPORTED_FAMILIES: dict[str, tuple[str, ...]] = {
    "ViT": ("ViTModel", "ViTForImageClassification"),
    "DeiT": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "DINOv2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "Swin": ("SwinModel", "SwinForImageClassification"),
}
_SUPPORTED = {name: family for family, names in SUPPORTED_FAMILIES.items() for name in names}
EXAMPLE = "fxq.example"  # node.meta: the node's value on the example batch while tracing
EXAMPLE_2 = "fxq.example_2"  # the same on a batch of another size (what the batch size changes)
VARIES = "fxq.varies"  # node.meta: reads the input's values or a parameter (never folded to a constant)
_DATA = "fxq.data_dependent"  # node.meta: the value depends on tensor values, not only on shapes
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "type", "is_floating_point", "is_contiguous"}
_CONCRETE_KWARGS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False}


def is_hf_model(model: Any) -> bool:
    """True for an instance of a ``transformers`` model class (or a subclass of one)."""
    return isinstance(model, nn.Module) and any(
        (getattr(cls, "__module__", "") or "").startswith("transformers.") for cls in type(model).__mro__
    )


def supported_family(model: nn.Module) -> Optional[str]:
    """The family (``"ViT"``, ...) of ``model``'s class or its nearest listed base class."""
    return next((_SUPPORTED[c.__name__] for c in type(model).__mro__ if c.__name__ in _SUPPORTED), None)


def families_text() -> str:
    return "; ".join(f"{family}: {', '.join(names)}" for family, names in SUPPORTED_FAMILIES.items())


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def hf_image_spec(model: nn.Module) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """(channels, exact (H, W) or None) that the model's config asks for. ViT and DeiT add
    their position embeddings without interpolation, so they need the config's image size;
    DINOv2 interpolates and Swin pads, so any size works."""
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    size = getattr(config, "image_size", None)
    exact = supported_family(model) in ("ViT", "DeiT") and size is not None
    return channels, (_pair(size) if exact else None)


def default_example(model: nn.Module) -> torch.Tensor:
    """A seeded random batch of two images at the config's size (the global RNG is untouched)."""
    config = getattr(model, "config", None)
    size = _pair(getattr(config, "image_size", 224))
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.randn(2, getattr(config, "num_channels", 3), *size, generator=generator).to(device)


def _value(arg: Any, key: str = EXAMPLE) -> Any:
    return map_aggregate(arg, lambda a: a.node.meta[key] if isinstance(a, fx.Proxy) else a)


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    map_aggregate(arg, lambda a: found.append(a.node) if isinstance(a, fx.Proxy) else a)
    return found


class _ConcreteProxy(fx.Proxy):
    """A proxy that answers ``len``/``int``/``bool`` from the traced example's value."""

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len()"))

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int()"))

    def __index__(self) -> int:
        return int(self.tracer.concrete(self, "an index"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float()"))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _ConcreteAttribute(self, name)


class _ConcreteAttribute(fx.proxy.Attribute, _ConcreteProxy):
    pass


class HfTracer(fx.Tracer):
    """torch.fx tracing with every node's value computed on ``example`` as it is recorded."""

    def __init__(self, example: torch.Tensor, leaves: Sequence[type]):
        super().__init__()
        self.example = example
        self.examples = {EXAMPLE: example, EXAMPLE_2: torch.cat([example, example[:1]])}
        self.leaves = tuple(leaves)
        self._eager = False  # True while computing a value: module attributes and calls are real
        self.path_stack: list[str] = []
        self.failed_path: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        # only fxquant's leaves: other torch.nn modules (Swin's AdaptiveAvgPool1d, the pooler's
        # Tanh) are traced into their functions, which a saved graph can hold
        return isinstance(m, self.leaves) and not isinstance(m, nn.Sequential)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._eager else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._eager:
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path
            raise
        finally:
            self.path_stack.pop()

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        self._eager = True
        try:
            for key, example in self.examples.items():
                node.meta[key] = self._compute(kind, target, _value(args, key), _value(kwargs, key), example)
        finally:
            self._eager = False
        reads_shape = (kind == "call_function" and target is getattr and args[1] in _SHAPE_ATTRS) or (
            kind == "call_method" and target in _SHAPE_METHODS
        )
        inputs = _nodes_in((args, kwargs))
        node.meta[VARIES] = kind == "placeholder" or isinstance(node.meta[EXAMPLE], nn.Parameter)
        node.meta[VARIES] |= not reads_shape and any(n.meta.get(VARIES) for n in inputs)
        node.meta[_DATA] = kind == "call_method" and target in ("item", "tolist")
        if not reads_shape:
            node.meta[_DATA] |= any(n.meta.get(_DATA) or isinstance(n.meta.get(EXAMPLE), torch.Tensor) for n in inputs)
        return proxy

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict, example: torch.Tensor) -> Any:
        if kind == "placeholder":
            return example
        if kind == "get_attr":
            value: Any = self.root
            for part in target.split("."):
                value = getattr(value, part)
            return value
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        return None

    def concrete(self, proxy: fx.Proxy, use: str) -> Any:
        """The example's value of ``proxy`` for Python control flow (``use``); refused when
        it depends on tensor values rather than shapes."""
        node = proxy.node
        value = node.meta[EXAMPLE]
        if node.meta.get(_DATA) or (isinstance(value, torch.Tensor) and use != "iteration"):
            where = self.path_stack[-1] if self.path_stack else "the top-level forward"
            raise TraceError(
                f"data-dependent Python control flow in '{where}': {use} of {node.format_node()} depends "
                "on tensor values, not only on shapes; torch.fx cannot trace it"
            )
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "a condition"))

    def iter(self, obj: fx.Proxy):
        value = self.concrete(obj, "iteration")
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy):
        return self.concrete(obj, "** unpacking").keys()


def _traceable_class(base: type) -> type:
    """``base`` with a forward(pixel_values) that fixes the output switches and returns a dict."""

    def forward(self, pixel_values):
        output = base.forward(self, pixel_values, **_CONCRETE_KWARGS)
        return {key: value for key, value in output.items() if value is not None}

    return type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})


def _restore_attributes(model: nn.Module, saved: dict[str, dict]) -> None:
    """Undo what the forward wrote on modules while tracing (Swin clamps ``window_size``)."""
    for path, module in model.named_modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, fx.Proxy):
                if key in saved[path]:
                    setattr(module, key, saved[path][key])
                else:
                    delattr(module, key)


def _drop_noop_casts(graph: fx.Graph) -> int:
    """Remove ``x.to(dtype)`` / ``x.float()`` that change neither dtype nor device on the
    example (DINOv2 casts its input to the projection weight's dtype; eager attention casts
    the probabilities back to the query's): no value changes, and the graph no longer reads a
    parameter of a leaf module (which a saved graph could not hold)."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in ("to", "type", "float") or not node.args:
            continue
        source, before, after = node.args[0], None, node.meta.get(EXAMPLE)
        if isinstance(source, fx.Node):
            before = source.meta.get(EXAMPLE)
        same = isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
        if same and before.dtype == after.dtype and before.device == after.device:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            removed += 1
    return removed


def _size_assert(gm: fx.GraphModule, size: tuple[int, int]) -> None:
    """An assert node: the graph is specialised to the traced image size (H, W)."""
    graph = gm.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_before(placeholder.next):  # nodes created in order, each before the next
        shape = graph.call_function(getattr, (placeholder, "shape"))
        same_h = graph.call_function(operator.eq, (graph.call_function(operator.getitem, (shape, 2)), size[0]))
        same_w = graph.call_function(operator.eq, (graph.call_function(operator.getitem, (shape, 3)), size[1]))
        message = f"this graph was traced for {size[0]}x{size[1]} images; trace the model again for another size"
        graph.call_function(torch._assert, (graph.call_function(operator.and_, (same_h, same_w)), message))


def hf_trace(
    model: nn.Module, example: Optional[torch.Tensor] = None, *, leaves: Sequence[type] = ()
) -> fx.GraphModule:
    """Trace a transformers vision model (see the module docstring) on ``example`` (N, C, H, W);
    the default is a random batch at the config's image size."""
    name = type(model).__name__
    family = supported_family(model)
    if family is None:
        warnings.warn(
            f"{name} is not one of the transformers families fxquant maps onto its groups ({families_text()}); "
            "tracing it anyway: check report.float_points for the ops it leaves in float",
            stacklevel=3,
        )
    copied = copy.deepcopy(model).eval()
    config = getattr(copied, "config", None)
    if getattr(copied, "_supports_sdpa", False) and getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        copied.set_attn_implementation("sdpa")  # the same attention as eager, one node for decompose_attention
    if example is None:
        example = default_example(copied)
    example = example[:2] if example.shape[0] >= 2 else torch.cat([example, example])  # batch 1 is no special case
    saved = {path: dict(vars(m)) for path, m in copied.named_modules()}
    base = type(copied)
    tracer = HfTracer(example.detach(), leaves)
    copied.__class__ = _traceable_class(base)
    try:
        with torch.no_grad():
            graph = tracer.trace(copied)
    except Exception as exc:
        where = tracer.failed_path or "<top level>"
        owner = type(copied.get_submodule(tracer.failed_path)).__name__ if tracer.failed_path else name
        supported = f"{family} is supported" if family else "this class is not one of the supported ones"
        raise TraceError(
            f"could not trace the transformers model {name}: module '{where}' ({owner}) failed with "
            f"{type(exc).__name__}: {exc}. fxquant traces these transformers families ({supported}): "
            f"{families_text()}; eval mode, attention 'eager' or 'sdpa'."
        ) from exc
    finally:
        copied.__class__ = base
        _restore_attributes(copied, saved)
    _drop_noop_casts(graph)
    gm = fx.GraphModule(copied, graph, class_name=name + "Traced")
    fold_constants(gm, EXAMPLE, EXAMPLE_2, VARIES)
    drop_noop_reshapes(gm, EXAMPLE, EXAMPLE_2)
    for node in gm.graph.nodes:
        for key in (EXAMPLE, EXAMPLE_2, VARIES, _DATA):
            node.meta.pop(key, None)
    gm.graph.eliminate_dead_code()
    _, exact = hf_image_spec(copied)
    _size_assert(gm, exact or tuple(example.shape[2:4]))
    gm.recompile()
    stamp_origins(gm.graph)
    gm.meta["fxq.model_name"] = name
    gm.meta[HF_FAMILY_META] = family
    return gm
