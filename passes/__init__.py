"""fxquant's graph passes, one module each (installed as ``fxquant.passes``)."""

from fxquant.passes.annotate import Annotate
from fxquant.passes.bias_correction import BiasCorrection
from fxquant.passes.calibrate import Calibrate
from fxquant.passes.decompose_attention import DecomposeAttention
from fxquant.passes.fuse_int_attention import FuseIntAttention
from fxquant.passes.fuse_residual_adds import FuseResidualAdds
from fxquant.passes.fuse_scales import FuseScales
from fxquant.passes.gptq import Gptq
from fxquant.passes.insert_observers import InsertObservers
from fxquant.passes.linear_modules import LinearModules
from fxquant.passes.lower_fake_quant import LowerFakeQuant
from fxquant.passes.lower_integer import LowerInteger
from fxquant.passes.lower_log_int_softmax import LowerLogIntSoftmax
from fxquant.passes.pack_int4_weights import PackInt4Weights
from fxquant.passes.reparameterize import Reparameterize
from fxquant.passes.rotate import Rotate
from fxquant.passes.smooth import Smooth
from fxquant.passes.split_qkv import SplitQkv
from fxquant.passes.use_onednn_kernels import UseOnednnKernels

__all__ = [
    "Annotate",
    "BiasCorrection",
    "Calibrate",
    "DecomposeAttention",
    "FuseIntAttention",
    "FuseResidualAdds",
    "FuseScales",
    "Gptq",
    "InsertObservers",
    "LinearModules",
    "LowerFakeQuant",
    "LowerInteger",
    "LowerLogIntSoftmax",
    "PackInt4Weights",
    "Reparameterize",
    "Rotate",
    "Smooth",
    "SplitQkv",
    "UseOnednnKernels",
]
