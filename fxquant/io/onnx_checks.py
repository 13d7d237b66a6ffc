"""What :func:`fxquant.io.onnx_export.export_onnx` checks around torch's exporter: the opset,
the output path, an exporter failure as one line (its TorchScript IR in ``<file>.log``,
not on the console) and ``onnx.checker`` on the written file."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from fxquant.errors import FxqError

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


class OnnxExportError(FxqError):
    """A compiled model (or one of its nodes) cannot be written as ONNX."""


def max_opset() -> int | None:
    """The newest opset torch's TorchScript exporter writes (20 in torch 2.14); None if this
    torch does not say (its exporter then refuses a too-new opset itself)."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:
        return None
    return ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise OnnxExportError(
            f"opset {opset} has no per-axis QuantizeLinear/DequantizeLinear; use opset >= {MIN_OPSET}"
        )
    newest = max_opset()
    if newest is not None and opset > newest:
        raise OnnxExportError(
            f"opset {opset}: torch's TorchScript ONNX exporter writes opsets up to {newest}; "
            f"use an opset from {MIN_OPSET} to {newest}"
        )


def writable_path(path: Path) -> Path:
    """``path`` as a file to write: not a directory, its folder created."""
    if path.is_dir():
        raise OnnxExportError(f"{path} is a directory; give the .onnx file to write, such as {path / 'model.onnx'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OnnxExportError(f"cannot write {path}: a part of {path.parent} is a file, not a directory") from None
    return path


def export_failure(exc: Exception, path: Path, log: str) -> OnnxExportError:
    """One line from torch's exporter error: its first line, the node kind it names; the
    exporter's own output (the TorchScript IR) goes to ``<path>.log`` instead of the console."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    kind = re.search(r"node has kind '([^']+)'", text)
    node = f" (node kind {kind.group(1)})" if kind and kind.group(1) not in first else ""
    saved = ""
    if log.strip():
        log_path = path.with_name(path.name + ".log")
        with contextlib.suppress(OSError):
            log_path.write_text(log)
            saved = f"; the exporter's output (TorchScript IR) is in {log_path}"
    return OnnxExportError(f"torch.onnx.export failed for {path}: {type(exc).__name__}: {first[:240]}{node}{saved}")


def check_file(path: Path) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise OnnxExportError(
            "checking the exported file needs the onnx package: pip install 'fxquant[onnx]' (or pass check=False)"
        ) from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise OnnxExportError(f"{path}: the exported file fails onnx.checker: {first[:240]}") from exc
