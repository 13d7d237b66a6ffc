"""Tracing with the example input's shapes: Python control flow on sizes becomes traceable.

Many timm models branch on tensor sizes (Twins, TinyViT: ``if pad_r > 0``; ConViT: ``if
rel_indices.shape[1] != N``; NesT: ``int(N ** 0.5)``; CrossViT: ``if H != img_size``).
``torch.fx`` sees a symbolic size there and gives up. This tracer runs the model on a real
example alongside the trace, so every proxy knows its value, and a size read from a tensor
is a plain ``int`` -- the graph is specialised to the example's image size -- except the sizes
that depend on the batch: the example is ``BATCH`` copies of one image, and a size divisible
by ``BATCH`` (the batch, ``B * windows``, ``B * N``) stays a node reading the real size, so the
graph keeps working at any batch size. A branch on a value (not a size) still fails.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute

BATCH = 17  # a batch size no model dimension is likely to be a multiple of
try:  # running a module for its value must not be traced itself: lift fx's patches meanwhile
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _untraced
except ImportError:  # pragma: no cover - older torch: no patcher to lift
    _untraced = contextlib.nullcontext
_UNKNOWN = object()


class ValueProxy(fx.Proxy):
    """A proxy that also holds its value on the example input (``_UNKNOWN`` when not computed)."""

    value: Any = _UNKNOWN  # set by the tracer; a class default, so reading it never makes a node

    def _size(self, value: torch.Tensor, index: int):
        size = value.shape[index]
        if size % BATCH:
            return size
        shape = self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        return self.tracer.create_proxy("call_function", operator.getitem, (shape, index), {})

    @property
    def shape(self):
        if not isinstance(self.value, torch.Tensor):
            return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        return tuple(self._size(self.value, i) for i in range(self.value.dim()))

    def size(self, dim=None):
        if not isinstance(self.value, torch.Tensor):
            args = (self,) if dim is None else (self, dim)
            return self.tracer.create_proxy("call_method", "size", args, {})
        return self.shape if dim is None else self._size(self.value, dim)

    def dim(self):
        if isinstance(self.value, torch.Tensor):
            return self.value.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    @property
    def ndim(self):
        return self.dim()

    def __setitem__(self, index, value) -> None:  # MViTv2's attn[:, :, 1:, 1:] += rel_pos: a kept node
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


def batch_example(example: torch.Tensor) -> torch.Tensor:
    """``BATCH`` copies of the example's first image."""
    return example[:1].expand(BATCH, *example.shape[1:]).contiguous()


def _value(arg: Any) -> Any:
    if isinstance(arg, Attribute):  # x.device, x.dtype: fx makes these without the tracer
        return getattr(_value(arg.root), arg.attr)
    if isinstance(arg, fx.Proxy):  # never getattr on a proxy: that would add a node
        value = arg.__dict__.get("value", _UNKNOWN) if isinstance(arg, ValueProxy) else _UNKNOWN
        if value is _UNKNOWN:
            raise LookupError
        return value
    return arg


def with_values(tracer_class: type, example: torch.Tensor) -> type:
    """A subclass of ``tracer_class`` whose proxies carry their values on ``example``."""

    class ConcreteShapeTracer(tracer_class):
        # a buffer read in forward is a get_attr node with its value, not a constant: a size
        # argument that depends on the batch (``rel_indices.expand(B, ...)``) can then be a node
        proxy_buffer_attributes = True

        def proxy(self, node: fx.Node) -> fx.Proxy:
            return ValueProxy(node, self)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            if isinstance(proxy, ValueProxy):
                proxy.value = self._evaluate(kind, target, args, kwargs)
            return proxy

        def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
            try:
                if kind == "placeholder":  # the first one is the image
                    self.inputs_seen = getattr(self, "inputs_seen", 0) + 1
                    return example if self.inputs_seen == 1 else _UNKNOWN
                values = map_aggregate(args, _value)
                named = map_aggregate(kwargs, _value)
                with torch.no_grad(), _untraced():
                    if kind == "call_function":
                        return target(*values, **named)
                    if kind == "call_method":
                        return getattr(values[0], target)(*values[1:], **named)
                    if kind == "call_module":
                        return self.root.get_submodule(target)(*values, **named)
                    if kind == "get_attr":
                        value: Any = self.root
                        for part in str(target).split("."):
                            value = getattr(value, part)
                        return value
            except Exception:  # an op the example cannot run: its value stays unknown
                return _UNKNOWN
            return _UNKNOWN

    return ConcreteShapeTracer
