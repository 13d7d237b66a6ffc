"""Helpers that craft .fxq files the way an attacker would: edit the document and the tensors,
then recompute every digest, so that only the loader's own checks stand in the way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from fxquant.io.serialize import DOC_KEY, HASH_KEY, _tensors_digest


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        document = json.loads(fh.metadata()[DOC_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return document, tensors


def craft(
    src: Path,
    dst: Path,
    edit: Optional[Callable[[dict], None]] = None,
    edit_tensors: Optional[Callable[[dict], None]] = None,
    text: Optional[str] = None,
) -> Path:
    """``src`` with its document and/or tensors edited, every listing and digest made consistent."""
    from safetensors.torch import save_file

    document, tensors = read(src)
    if edit is not None:
        edit(document)
    if edit_tensors is not None:
        edit_tensors(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        document["tensors"] = {
            k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for k, t in sorted(tensors.items())
        }
        document["tensors_sha256"] = _tensors_digest(tensors)
    if text is None:
        text = json.dumps(document)
    save_file(tensors, str(dst), metadata={DOC_KEY: text, HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})
    return dst


def nodes_of(document: dict, op: str) -> list[dict]:
    return [n for n in document["nodes"] if n["op"] == op]


def process_state() -> tuple:
    """Process-wide torch state a loaded model must not change."""
    return (
        torch.get_default_dtype(),
        str(torch.empty(0).device),
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.random.get_rng_state().sum().item(),
        str(torch._tensor_str.PRINT_OPTS.__dict__),
    )
