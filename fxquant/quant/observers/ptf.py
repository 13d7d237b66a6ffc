"""The PTF observer (FQ-ViT): per-channel power-of-two factors over one layer-wise scale.

See :mod:`fxquant.quant.ptf` for the factors' meaning and the integer LayerNorm they feed."""

from __future__ import annotations

import torch

from fxquant.quant.observers.base import range_to_scale_zero_point
from fxquant.quant.observers.omse import OmseObserver
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize
from fxquant.quant.spec import QuantSpec

__all__ = ["PtfObserver"]


@register_observer("ptf")
class PtfObserver(OmseObserver):
    """Per-channel power-of-two factors over one layer-wise scale (channel_wise only)."""

    @classmethod
    def check_spec(cls, spec: QuantSpec) -> None:
        if spec.granularity != "channel_wise" or spec.method != "uniform":
            raise ValueError(
                "PtfObserver gives each channel a power-of-two multiple of one scale: it needs "
                "calibration_mode channel_wise and quantization_method uniform"
            )

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.factors = int(spec.option("ptf_factors", 4))

    def compute_qparams(self) -> QParams:
        if self._n == 0:
            return super().compute_qparams()  # raises the "no calibration data" error
        lo, hi = self.min.min(), self.max.max()
        top_scale, zp = range_to_scale_zero_point(lo.reshape(1), hi.reshape(1), self.spec)
        base = top_scale / 2 ** (self.factors - 1)
        best_err, best_alpha = None, None
        for alpha in range(self.factors):
            scale = (base * 2**alpha).expand(self.sample.shape[0])
            qp = QParams(scale, zp.expand_as(scale), self.spec.qmin, self.spec.qmax, axis=0)
            err = (fake_quantize(self.sample, qp) - self.sample).pow_(2).sum(1)
            if best_err is None:
                best_err, best_alpha = err, torch.zeros_like(err)
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better, torch.full_like(best_alpha, alpha), best_alpha)
        scale = base * torch.pow(2.0, best_alpha)
        return QParams(scale, zp.expand_as(scale).clone(), self.spec.qmin, self.spec.qmax, self._grouping.axis)
