"""Save and load a compiled fake-quant GraphModule without pickle.

One file, in the safetensors format:

- the tensors: every parameter and buffer of the graph's submodules, the get_attr constants
  (cls_token, pos_embed, Swin's relative position tables and masks), and every QParams
  scale / zero point;
- the safetensors ``metadata`` (a string dict) holds ``fxquant.document``, a JSON document
  (format version, fxquant version, the graph as a node list, the submodules as
  (allowlisted type, constructor config) descriptions, the fxq.* node meta, the report and the
  qconfig), and ``fxquant.sha256``, the SHA-256 of that document. The document also lists
  every tensor's name, dtype, shape and the SHA-256 of all tensor bytes.

Loading is safe by construction (what a file can and cannot do: docs/saving-and-export.md):
it runs no pickle and no code from the file; the graph is rebuilt node by node through the
fx Graph API with every name, target, method, keyword and constant checked
(``fxquant.io.serial_graph``); modules are checked against their schemas before anything is
allocated (``fxquant.io.serial_modules``); the document's size, container count and depth are
bounded (``fxquant.io.serial_read``); an embedded qconfig may not ``extends`` another path.
The SHA-256 digests detect a truncated or corrupted file: they are an integrity check, not a
signature (anyone who edits a file can recompute them). Every failure is a
:class:`SerializeError` (an :class:`~fxquant.errors.FxqError`) naming the node or module.

Supported: the ``fake`` and ``int`` backends (FakeQuantize, QuantLinear, QuantConv2d,
LogIntSoftmax, the int backend's QuantizeCodes/DequantizeCodes/IntLinear/IntMatmul, fxquant.debug's
FloatPoint, and the float leaf modules listed in ``_MODULE_TYPES``). Anything else (an
observer, a model-specific leaf) is refused at save time with an
error that names the module and its type.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxquant.infra.records import PassRecord, Report
from fxquant.io.serial_graph import IDENTIFIER, check_path, function_key, rebuild_graph
from fxquant.io.serial_read import (
    DOC_KEY,
    FORMAT,
    FORMAT_VERSION,
    HASH_KEY,
    _check_tensors,
    _fxquant_version,
    _read,
    _tensors_digest,
    _trial_run,
)
from fxquant.io.serial_table import _attach, _build_module, _module_tensors, _module_types, _type_key
from fxquant.io.serial_values import SerializeError, decode, encode
from fxquant.quant.qconfig import qconfig_from_dict
from fxquant.runtime.int_attention import IntAttention, kernel_error, load_kernel

__all__ = ["save", "load", "SerializeError", "FORMAT_VERSION"]


# --------------------------------------------------------------------------- save


def _encode_meta(node: fx.Node) -> dict:
    out = {}
    for key, value in node.meta.items():
        if key.startswith("fxq."):
            out[key] = encode(value, f"node '{node.name}' meta {key}")
    return out


def _report_dict(report: Report) -> dict:
    return {
        "model": report.model,
        "qconfig": report.qconfig,
        "backend": report.backend,
        "passes": [
            {
                "name": p.name,
                "seconds": p.seconds,
                "output_qsnr_db": p.output_qsnr_db,
                "nodes": p.nodes,
                "first_drop": p.first_drop,
                "notes": p.notes,
                "diff_seconds": p.diff_seconds,
                "dump_seconds": p.dump_seconds,
            }
            for p in report.passes
        ],
        "float_points": report.float_points,
        "notes": report.notes,
        "keep_float": report.keep_float,
        "warnings": report.warnings,
        "weight_coverage": report.weight_coverage,
        "weight_bytes": report.weight_bytes,
    }


def save(qm: fx.GraphModule, path: str | Path) -> Path:
    """Write the compiled fake-quant GraphModule ``qm`` to ``path`` (one safetensors file).

    Weights and every quantization parameter go to the safetensors tensors; the graph, the
    submodule descriptions, the fxq.* node meta, ``qm.report``, ``qm.qconfig`` and
    ``qm.keep_float`` go to a JSON document in the file's metadata. No pickle is written."""
    from safetensors.torch import save_file

    if not isinstance(qm, fx.GraphModule):
        raise SerializeError(
            f"save expects a torch.fx.GraphModule (the result of fxquant.compile), got {type(qm).__name__}"
        )
    table = _module_types()
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensors[key] = tensor.detach().clone(memory_format=torch.contiguous_format)

    nodes, modules, attrs = [], {}, {}
    for node in qm.graph.nodes:
        where = f"node '{node.name}'"
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = function_key(node.target, where)
        elif node.op in ("call_module", "get_attr", "call_method", "placeholder", "output"):
            entry["target"] = str(node.target)
        else:
            raise SerializeError(f"{where}: unknown node op {node.op!r}")
        entry["args"] = encode(node.args, where)
        entry["kwargs"] = encode(dict(node.kwargs), where)
        meta = _encode_meta(node)
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
        if node.op == "call_module" and node.target not in modules:
            module = qm.get_submodule(node.target)
            key = _type_key(module, table, f"{where} (module '{node.target}')")
            desc = {"type": key, "config": table[key][1](module), "training": module.training, "tensors": {}}
            if any(True for _ in module.children()):
                raise SerializeError(
                    f"{where}: module '{node.target}' ({key}) has submodules; only leaf modules are supported"
                )
            for local, (kind, tensor) in _module_tensors(module).items():
                tkey = f"module:{node.target}:{local}"
                put(tkey, tensor)
                desc["tensors"][local] = {"kind": kind, "key": tkey}
            modules[node.target] = desc
        elif node.op == "get_attr" and node.target not in attrs:
            *prefix, field = node.target.split(".")
            owner = qm.get_submodule(".".join(prefix)) if prefix else qm
            value = getattr(owner, field)
            if not isinstance(value, torch.Tensor):
                raise SerializeError(
                    f"{where}: get_attr '{node.target}' is a {type(value).__name__}; only tensors are supported"
                )
            kind = ("param" if value.requires_grad else "param_nograd") if isinstance(value, nn.Parameter) else "buffer"
            tkey = f"attr:{node.target}"
            put(tkey, value)
            attrs[node.target] = {"kind": kind, "key": tkey}

    report = getattr(qm, "report", None)
    qconfig = getattr(qm, "qconfig", None)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxquant_version": _fxquant_version(),
        "torch_version": torch.__version__,
        "training": qm.training,
        "nodes": nodes,
        "modules": modules,
        "attrs": attrs,
        "report": None if report is None else encode(_report_dict(report), "report"),
        "qconfig": None
        if qconfig is None
        else {"dict": encode(qconfig.to_dict(), "qconfig"), "source": qconfig.source},
        "keep_float": encode(list(getattr(qm, "keep_float", []) or []), "keep_float"),
        "tensors": {
            k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for k, t in sorted(tensors.items())
        },
        "tensors_sha256": _tensors_digest(tensors),
        "input": input_description(qm),
    }
    text = json.dumps(document, allow_nan=False, sort_keys=True, separators=(",", ":"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={DOC_KEY: text, HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})
    return path


# --------------------------------------------------------------------------- load


def load(path: str | Path) -> fx.GraphModule:
    """Read a file written by :func:`save`; returns the GraphModule, with ``.report``,
    ``.qconfig`` and ``.keep_float`` restored.

    Loading runs no pickle and no code from the file, allocates nothing the file's own
    tensors do not hold, and changes no process-wide state: every node, module and value is
    checked (``fxquant.io.serial_graph``, ``fxquant.io.serial_modules``), then the graph runs once on
    a zero input of the saved input shape, so a file whose tensors do not fit its graph fails
    here, naming the node, and not at the first call. Every failure is a SerializeError."""
    path = Path(path)
    document, tensors = _read(path)
    _check_tensors(path, document, tensors)
    try:
        gm = _rebuild(path, document, tensors)
    except SerializeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:
        raise SerializeError(f"{path}: malformed fxquant document: {type(exc).__name__}: {exc}") from None
    _trial_run(path, gm, document.get("input"))
    return gm


def _tensor(tensors: dict, key: Any, where: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise SerializeError(f"{where}: tensor {key!r:.80} is missing from the file")
    return tensors[key]


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SerializeError(f"{where}: expected an object")
    return value


def _rebuild(path: Path, document: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    root: dict[str, Any] = {}
    modules, attrs = _dict(document.get("modules"), f"{path}: modules"), _dict(document.get("attrs"), f"{path}: attrs")
    for target, desc in modules.items():
        where = f"{path}: module '{target}'"
        check_path(target, "module path", where)
        desc = _dict(desc, where)
        if set(desc) != {"type", "config", "training", "tensors"} or type(desc["training"]) is not bool:
            raise SerializeError(f"{where}: malformed module description")
        local = {}
        for name, info in _dict(desc["tensors"], where).items():
            info = _dict(info, where)
            if not isinstance(name, str) or not (name.startswith("#") or IDENTIFIER.fullmatch(name)):
                raise SerializeError(f"{where}: invalid tensor name {name!r:.40}")
            if info.get("kind") not in _TENSOR_KINDS:
                raise SerializeError(f"{where}: unknown tensor kind {info.get('kind')!r:.40} for {name!r}")
            local[name] = (info["kind"], _tensor(tensors, info.get("key"), where))
        module = _build_module(desc["type"], desc["config"], local, where)
        for name, (kind, tensor) in local.items():
            if not name.startswith("#"):
                _attach(module, name, kind, tensor, where)
        module.train(desc["training"])
        root[target] = module
    for target, info in attrs.items():
        where = f"{path}: attribute '{target}'"
        check_path(target, "attribute path", where)
        info = _dict(info, where)
        t = _tensor(tensors, info.get("key"), where)
        if info.get("kind") in ("param", "param_nograd"):
            if not t.is_floating_point():
                raise SerializeError(f"{where}: a parameter must be a floating-point tensor, got {t.dtype}")
            t = nn.Parameter(t, requires_grad=info["kind"] == "param")
        elif info.get("kind") != "buffer":
            raise SerializeError(f"{where}: unknown kind {info.get('kind')!r:.40}")
        root[target] = t
    _check_tree(path, root)
    graph = rebuild_graph(document.get("nodes"), modules, attrs, str(path))
    gm = fx.GraphModule(root, graph)
    gm.train(document.get("training") is True)
    for target, desc in modules.items():  # GraphModule(...) keeps the modules' own modes
        gm.get_submodule(target).train(desc["training"])
    if document.get("report") is not None:
        gm.report = _report_from(decode(document["report"], None, f"{path}: report"))
    if document.get("qconfig") is not None:
        gm.qconfig = _qconfig_from(path, document["qconfig"])
    gm.keep_float = _strings(decode(document.get("keep_float", []), None, f"{path}: keep_float"), f"{path}: keep_float")
    _warn_without_kernel(path, root)
    return gm


_TENSOR_KINDS = ("param", "param_nograd", "buffer", "buffer_np", "qparams")


def _check_tree(path: Path, root: dict) -> None:
    """No module or attribute path may be a prefix of another (fx would nest one inside the other)."""
    names = sorted(root)
    for a, b in zip(names, names[1:]):
        if b.startswith(a + "."):
            raise SerializeError(f"{path}: '{b}' lies inside '{a}'; saved modules and attributes are leaves")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SerializeError(f"{where}: expected a list of strings")
    return value


def _qconfig_from(path: Path, raw: Any):
    """The embedded qconfig; it is complete, so it may not point at other files."""
    raw = _dict(raw, f"{path}: qconfig")
    config = decode(raw.get("dict"), None, f"{path}: qconfig")
    if not isinstance(config, dict) or "extends" in config:
        raise SerializeError(
            f"{path}: the embedded qconfig must be a complete mapping without 'extends' (a file "
            "never makes fxquant read another path)"
        )
    source = raw.get("source", str(path))
    return qconfig_from_dict(config, source if isinstance(source, str) else str(path))


def _warn_without_kernel(path: Path, root: dict) -> None:
    if any(isinstance(m, IntAttention) for m in root.values()) and not load_kernel():
        warnings.warn(
            f"{path}: the fused attention kernel is not available ({kernel_error()}); its IntAttention "
            "modules run the same ops in torch, slower",
            RuntimeWarning,
            stacklevel=4,
        )


def input_description(qm: fx.GraphModule) -> Any:
    """The per-sample input shape the graph was compiled for (from shape propagation), or None."""
    for node in qm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is not None and 2 <= len(shape) <= 5:
                return {"shape": [int(v) for v in shape[1:]]}
            return None
    return None


def _report_from(raw: dict) -> Report:
    passes = [
        PassRecord(
            name=p["name"],
            seconds=p["seconds"],
            output_qsnr_db=p["output_qsnr_db"],
            nodes=list(p["nodes"]),
            first_drop=p["first_drop"],
            notes=list(p["notes"]),
            diff_seconds=p.get("diff_seconds", 0.0),  # files written before these timings existed lack them
            dump_seconds=p.get("dump_seconds", 0.0),
        )
        for p in raw["passes"]
    ]
    return Report(
        model=raw["model"],
        qconfig=raw["qconfig"],
        backend=raw["backend"],
        passes=passes,
        float_points=list(raw["float_points"]),
        notes=list(raw["notes"]),
        keep_float=list(raw["keep_float"]),
        warnings=list(raw.get("warnings", [])),  # files written before the weight coverage have neither
        weight_coverage=raw.get("weight_coverage"),
        weight_bytes=raw.get("weight_bytes"),  # integer graphs, since packed 4-bit weights
    )
