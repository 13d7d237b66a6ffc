"""fxquant: post-training quantization of vision transformers as torch.fx graph passes."""

from fxquant.analysis.stats import layer_statistics, write_statistics
from fxquant.api import compile
from fxquant.debug import DiffResult, compile_keep_float, diff, isolated_errors, sensitivity
from fxquant.errors import FxqError, PassError, QConfigError, TraceError
from fxquant.infra.records import Report
from fxquant.io.onnx_export import OnnxExportError, export_onnx
from fxquant.io.serialize import SerializeError, load, save
from fxquant.ir.trace import trace
from fxquant.quant import distributed
from fxquant.quant.qconfig import QConfig, load_qconfig, preset_names
from fxquant.report.html_page import write_html_report
from fxquant.version import __version__

__all__ = [
    "distributed",
    "compile",
    "trace",
    "load_qconfig",
    "preset_names",
    "QConfig",
    "Report",
    "FxqError",
    "PassError",
    "QConfigError",
    "TraceError",
    "__version__",
    "diff",
    "DiffResult",
    "isolated_errors",
    "sensitivity",
    "compile_keep_float",
    "layer_statistics",
    "write_statistics",
    "write_html_report",
    "save",
    "load",
    "SerializeError",
    "export_onnx",
    "OnnxExportError",
]
