"""Reading an .fxq file's container before anything is built from it: the safetensors
header's size, the document's digest, size, number of JSON containers and depth, the format
and fxquant versions, and the tensor listing against the tensors; then, after the rebuild,
one trial run of the graph on a zero input of its saved shape."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from fxquant.io.serial_values import SerializeError
from fxquant.version import __version__

FORMAT = "fxquant.graph"
FORMAT_VERSION = 2
DOC_KEY = "fxquant.document"
HASH_KEY = "fxquant.sha256"


def _fxquant_version() -> str:
    return __version__


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(repr(tuple(t.shape)).encode())
        flat = t.clone(memory_format=torch.contiguous_format).reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


#: the largest fxquant document (JSON) a file may carry; ViT-B int w8a8 has 0.35 MB
MAX_DOCUMENT_BYTES = 64 * 2**20
#: the most JSON containers ([ and {) in a document; ViT-B int w8a8 has about 9,000
MAX_CONTAINERS = 2_000_000
#: the deepest JSON nesting; fxquant writes about 10 levels
MAX_JSON_DEPTH = 48


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise SerializeError(f"{path}: no such file")
    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, OSError...)
        raise SerializeError(
            f"{path}: not a readable fxquant model file (truncated or corrupted?): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        ) from None
    text, digest = metadata.get(DOC_KEY), metadata.get(HASH_KEY)
    if text is None or digest is None:
        raise SerializeError(
            f"{path}: a safetensors file without an fxquant document; it was not written by fxquant.io.serialize.save"
        )
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        raise SerializeError(
            f"{path}: the fxquant document's SHA-256 does not match: the file was altered or corrupted"
        )
    document = _parse(path, text)
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise SerializeError(
            f"{path}: written with fxquant file format version {version!r:.20} (fxquant "
            f"{document.get('fxquant_version')!r:.20}); this fxquant {_fxquant_version()} reads "
            f"format version {FORMAT_VERSION} only; re-save the model with this version"
        )
    if document.get("fxquant_version") != _fxquant_version():
        raise SerializeError(
            f"{path}: written by fxquant {document.get('fxquant_version')!r:.20}, this is fxquant "
            f"{_fxquant_version()}; quantization semantics may differ between versions, so "
            "re-compile (or re-save) the model with this version"
        )
    return document, tensors


def _check_header_size(path: Path) -> None:
    """Refuse an oversized safetensors header before anything parses it."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise SerializeError(
            f"{path}: not a readable fxquant model file (truncated or corrupted?): shorter than a safetensors header"
        )
    size = int.from_bytes(head, "little")
    if size > MAX_DOCUMENT_BYTES + 16 * 2**20:
        raise SerializeError(
            f"{path}: the file's header is {size / 2**20:.0f} MiB; an fxquant file's is at most "
            f"{(MAX_DOCUMENT_BYTES + 16 * 2**20) / 2**20:.0f} MiB"
        )


def _parse(path: Path, text: str) -> dict:
    """The document's JSON, with its size, number of containers and depth bounded."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise SerializeError(
            f"{path}: the fxquant document is {len(text) / 2**20:.0f} MiB, over the limit of "
            f"{MAX_DOCUMENT_BYTES / 2**20:.0f} MiB"
        )
    containers = text.count("[") + text.count("{")
    if containers > MAX_CONTAINERS:
        raise SerializeError(
            f"{path}: the fxquant document holds {containers} JSON lists/objects, over the limit of {MAX_CONTAINERS}"
        )
    try:
        document = json.loads(text)
    except RecursionError:
        raise SerializeError(f"{path}: the fxquant document is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise SerializeError(f"{path}: the fxquant document is not valid JSON: {exc}") from None
    _check_depth(path, document)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SerializeError(
            f"{path}: not an fxquant model file (format {document.get('format')!r:.40})"
            if isinstance(document, dict)
            else f"{path}: malformed fxquant document"
        )
    return document


def _check_depth(path: Path, document: Any) -> None:
    level, depth = [document], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise SerializeError(f"{path}: the fxquant document is nested deeper than {MAX_JSON_DEPTH} levels")
        level = [
            v
            for item in level
            for v in (item.values() if isinstance(item, dict) else item)
            if isinstance(v, (dict, list))
        ]


def _check_tensors(path: Path, document: dict, tensors: dict[str, torch.Tensor]) -> None:
    listed = document.get("tensors")
    if not isinstance(listed, dict) or set(listed) != set(tensors):
        missing = sorted(set(listed if isinstance(listed, dict) else {}) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(listed if isinstance(listed, dict) else {}))[:5]
        raise SerializeError(
            f"{path}: the tensors in the file do not match its document (missing {missing}, unexpected {extra})"
        )
    for key, info in listed.items():
        t = tensors[key]
        if (
            not isinstance(info, dict)
            or str(t.dtype).removeprefix("torch.") != info.get("dtype")
            or list(t.shape) != info.get("shape")
        ):
            raise SerializeError(
                f"{path}: tensor '{key}' is {t.dtype} {list(t.shape)}, the document says {str(info)[:80]}"
            )
    if _tensors_digest(tensors) != document.get("tensors_sha256"):
        raise SerializeError(
            f"{path}: the tensor data's SHA-256 does not match the document: the file was altered or corrupted"
        )


def _trial_run(path: Path, gm: fx.GraphModule, spec: Any) -> None:
    """Run the graph once on a zero input of the saved shape; a failure names the node."""
    if spec is None:
        return
    if (
        not isinstance(spec, dict)
        or set(spec) != {"shape"}
        or not isinstance(spec["shape"], list)
        or not 1 <= len(spec["shape"]) <= 4
        or not all(type(v) is int and 1 <= v <= 4096 for v in spec["shape"])
    ):
        raise SerializeError(f"{path}: malformed input description {str(spec)[:80]}")
    x = torch.zeros((1, *spec["shape"]))
    interpreter = _NamingInterpreter(gm)
    try:
        with torch.no_grad():
            interpreter.run(x)
    except SerializeError:
        raise
    except Exception as exc:  # any failure of the file's graph on its own input shape
        node = interpreter.current
        what = f"node '{node.name}' ({node.op} {node.target})" if node is not None else "the graph"
        raise SerializeError(
            f"{path}: the file's graph fails on an input of its saved shape {spec['shape']} at "
            f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None


class _NamingInterpreter(fx.Interpreter):
    current: Any = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)
