"""What a saved graph may contain, and its rebuilding through the torch.fx Graph API.

A loaded graph can only compute: every node is checked against fixed grammars and
allowlists before torch.fx generates ``forward``'s Python source from it.

- names (nodes, placeholders, keyword arguments, module and attribute path segments) are
  Python identifiers that are not keywords, so nothing a file says is pasted into the
  generated source except identifiers, numbers and ``repr``'d strings;
- ``call_function`` targets come from :data:`FUNCTIONS`: pure tensor math and shape
  functions of ``operator``, ``torch``, ``torch.nn.functional`` and ``math``, two named timm
  helpers and ``getattr`` of a few tensor attributes; no function that reads or writes
  files, changes process-wide state (default dtype or device, threads, seeds, print
  options, flags) or allocates from constants alone (``zeros``, ``arange``, ``empty``...);
- ``call_method`` targets come from :data:`METHODS`: out-of-place tensor methods only (no
  ``numpy``, ``tofile``, ``untyped_storage``, ``copy_`` or other in-place method);
- constants are bounded: an ``expand`` or ``pad`` whose constant sizes would allocate more
  than :data:`MAX_CONSTANT_ELEMENTS` elements is refused.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import math
import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxquant.io.serial_values import SerializeError, decode

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
PATH_SEGMENT = re.compile(r"[A-Za-z0-9_]{1,200}")
MAX_NODES = 200_000
#: the most elements a constant-sized expand or pad may create
MAX_CONSTANT_ELEMENTS = 2**28

_OPERATOR = "getitem add sub mul truediv floordiv mod pow matmul neg pos abs eq ne lt le gt ge and_ or_ not_ invert"
_TORCH = (
    "_assert abs add sub mul div true_divide floor_divide remainder neg matmul bmm mm baddbmm addmm "
    "einsum cat concat concatenate stack roll flatten reshape permute transpose swapaxes squeeze "
    "unsqueeze split chunk unbind narrow flip softmax log_softmax exp log log2 sqrt rsqrt pow tanh "
    "sigmoid erf sin cos clamp clip round floor ceil trunc sign maximum minimum amax amin sum mean "
    "where masked_fill gather index_select relu layer_norm isfinite isnan"
)
_FUNCTIONAL = (
    "pad gelu silu relu linear conv2d layer_norm softmax log_softmax dropout "
    "scaled_dot_product_attention normalize adaptive_avg_pool1d adaptive_avg_pool2d"
)
_MATH = "sqrt floor ceil log log2 exp"
_TIMM = ("timm.layers.attention:resolve_self_attn_mask", "timm.layers.attention:maybe_add_mask")
#: tensor attributes ``getattr`` may read
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "ndim", "device", "T", "mT"})
#: tensor methods a ``call_method`` node may call: out of place, no I/O, no storage access
METHODS = frozenset(
    "view reshape permute transpose contiguous flatten unflatten unsqueeze squeeze expand expand_as reshape_as "
    "view_as softmax log_softmax mean sum amax amin size dim numel chunk split unbind narrow flip roll float "
    "type_as to masked_fill add sub mul div matmul clamp exp log sigmoid tanh sqrt rsqrt pow abs neg round "
    "floor t clone detach gelu relu sin cos".split()
)


def _table() -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for prefix, module, names in (
        ("operator", operator, _OPERATOR),
        ("torch", torch, _TORCH),
        ("torch.nn.functional", F, _FUNCTIONAL),
        ("math", math, _MATH),
    ):
        for name in names.split():
            table[f"{prefix}:{name}"] = getattr(module, name)
    table["builtins:getattr"] = builtins.getattr
    return table


#: "module:name" -> function, every call_function target a file may name
FUNCTIONS: dict[str, Callable] = _table()


def function_key(fn: Callable, where: str) -> str:
    """The file's name of a call_function target (at save time)."""
    for key, known in FUNCTIONS.items():
        if known is fn:
            return key
    qualified = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__name__', '')}"
    if qualified in _TIMM:
        return qualified
    raise SerializeError(
        f"{where}: call_function target {fn!r:.80} is not in the serializable allowlist "
        "(pure operator, torch, torch.nn.functional and math functions, getattr of tensor "
        "attributes, named timm helpers: fxquant.io.serial_graph.FUNCTIONS)"
    )


def resolve_function(text: Any, where: str) -> Callable:
    """The function a file names as a call_function target, or a SerializeError."""
    if isinstance(text, str) and text in FUNCTIONS:
        return FUNCTIONS[text]
    if isinstance(text, str) and text in _TIMM:
        module_name, name = text.split(":")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise SerializeError(
                f"{where}: the file needs {module_name}.{name}, which this timm does not have ({exc})"
            ) from None
    raise SerializeError(
        f"{where}: call_function target {text!r:.80} is not allowed; a file may only call "
        "pure tensor functions (fxquant.io.serial_graph.FUNCTIONS)"
    )


def check_identifier(name: Any, what: str, where: str) -> str:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name) or keyword.iskeyword(name):
        raise SerializeError(f"{where}: {what} {name!r:.80} is not a plain Python identifier")
    return name


def check_path(path: Any, what: str, where: str) -> str:
    """A dotted module or attribute path: identifier-like segments (digits allowed), no keywords."""
    if not isinstance(path, str) or len(path) > 1000:
        raise SerializeError(f"{where}: {what} {path!r:.80} is not a valid path")
    for segment in path.split("."):
        if not PATH_SEGMENT.fullmatch(segment) or keyword.iskeyword(segment):
            raise SerializeError(f"{where}: {what} {path!r:.80} is not a valid path (segment {segment!r:.40})")
    return path


def _constants(values: Iterable) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.extend(_constants(value))
        elif type(value) is int:
            out.append(value)
    return out


def _check_size(args: tuple, where: str, what: str) -> None:
    total = 1
    for value in _constants(args):
        if value > 0:
            total *= value
            if total > MAX_CONSTANT_ELEMENTS:
                raise SerializeError(
                    f"{where}: {what} with constant sizes {_constants(args)[:8]} would create "
                    f"more than {MAX_CONSTANT_ELEMENTS} elements"
                )


def _check_call(op: str, target: Any, args: tuple, kwargs: dict, where: str) -> None:
    if target is builtins.getattr:
        if len(args) != 2 or kwargs or args[1] not in TENSOR_ATTRIBUTES:
            raise SerializeError(f"{where}: getattr may only read {sorted(TENSOR_ATTRIBUTES)}, got {args[1:]!r:.80}")
    if op == "call_method":
        if not args or not isinstance(args[0], fx.Node):
            raise SerializeError(f"{where}: call_method '{target}' needs a graph node as its object")
        if target == "to":
            bad = [v for v in (*args[1:], *kwargs.values()) if not isinstance(v, (fx.Node, torch.dtype, bool))]
            if bad or not set(kwargs) <= {"dtype", "copy", "non_blocking"}:
                raise SerializeError(f"{where}: .to() may only change the dtype in a file, got {args[1:]!r:.80}")
        if target == "expand":
            _check_size(args[1:], where, "expand")
    if target is F.pad:
        _check_size(args[1:2] + tuple(kwargs.get("pad", ())), where, "pad")
    if op == "call_function" and target.__module__ == "_operator" and not any(isinstance(a, fx.Node) for a in args):
        raise SerializeError(f"{where}: an operator call on constants only (a traced graph folds those)")


def rebuild_graph(entries: Any, modules: dict, attrs: dict, where: str) -> fx.Graph:
    """The fx.Graph described by ``entries`` (the document's node list), every node checked."""
    if not isinstance(entries, list) or len(entries) > MAX_NODES:
        raise SerializeError(f"{where}: the node list must be a list of at most {MAX_NODES} nodes")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    outputs = 0
    for index, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not {"op", "name", "target", "args", "kwargs"} <= set(entry)
            or not set(entry) <= {"op", "name", "target", "args", "kwargs", "meta"}
        ):
            raise SerializeError(f"{where}: node #{index}: malformed node entry")
        name = check_identifier(entry["name"], "node name", f"{where}: node #{index}")
        at = f"{where}: node '{name}'"
        if name in env:
            raise SerializeError(f"{at}: duplicate node name")
        op, target = entry["op"], entry["target"]
        args, kwargs = decode(entry["args"], env, at), decode(entry["kwargs"], env, at)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise SerializeError(f"{at}: args must be a tuple and kwargs a dict")
        for key in kwargs:
            check_identifier(key, "keyword argument", at)
        if op == "call_function":
            target = resolve_function(target, at)
        elif op == "call_module":
            if check_path(target, "module", at) not in modules:
                raise SerializeError(f"{at}: call_module target {target!r:.80} is not described in the file")
        elif op == "get_attr":
            if check_path(target, "attribute", at) not in attrs:
                raise SerializeError(f"{at}: get_attr target {target!r:.80} is not described in the file")
        elif op == "call_method":
            if target not in METHODS:
                raise SerializeError(
                    f"{at}: tensor method {target!r:.80} is not allowed; a file may only call "
                    f"pure tensor methods (fxquant.io.serial_graph.METHODS)"
                )
        elif op == "placeholder":
            check_identifier(target, "input name", at)
            if kwargs or len(args) > 1 or (args and args[0] is not None and type(args[0]) not in (bool, int, float)):
                raise SerializeError(f"{at}: an input's default value may only be None or a number")
        elif op == "output":
            outputs += 1
            if len(args) != 1 or kwargs:
                raise SerializeError(f"{at}: the output node takes one value")
        else:
            raise SerializeError(f"{at}: unknown node op {op!r:.40}")
        if op in ("call_function", "call_method"):
            _check_call(op, target, args, kwargs, at)
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise SerializeError(f"{at}: torch.fx renamed the node to '{node.name}' (a reserved name)")
        meta = entry.get("meta") or {}
        if not isinstance(meta, dict):
            raise SerializeError(f"{at}: meta must be a dict")
        for key, value in meta.items():
            if not isinstance(key, str) or not key.startswith("fxq.") or len(key) > 64:
                raise SerializeError(f"{at}: unexpected meta key {key!r:.40}")
            node.meta[key] = decode(value, None, f"{at} meta {key}")
        env[name] = node
    if outputs != 1 or entries[-1].get("op") != "output":
        raise SerializeError(f"{where}: a graph ends with exactly one output node")
    try:
        graph.lint()
    except Exception as exc:  # lint raises RuntimeError or AssertionError with torch's wording
        raise SerializeError(f"{where}: the saved graph is not valid: {exc}") from None
    return graph
