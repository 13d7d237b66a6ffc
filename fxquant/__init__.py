"""fxquant: post-training quantization of vision transformers as torch.fx graph passes."""
from .api import compile
from . import distributed
from .debug import DiffResult, compile_keep_float, diff, isolated_errors, sensitivity
from .errors import FxqError, PassError, QConfigError, TraceError
from .html_report import write_html_report
from .onnx_export import OnnxExportError, export_onnx
from .qconfig import QConfig, load_qconfig, preset_names
from .report import Report
from .serialize import SerializeError, load, save
from .stats import layer_statistics, write_statistics
from .trace import trace

__version__ = "0.1.0"
__all__ = ["compile", "trace", "load_qconfig", "preset_names", "QConfig", "Report", "FxqError",
           "PassError", "QConfigError", "TraceError", "__version__", "diff", "DiffResult", "isolated_errors",
           "sensitivity", "compile_keep_float", "layer_statistics", "write_statistics", "write_html_report", "save", "load",
           "SerializeError", "export_onnx", "OnnxExportError"]
