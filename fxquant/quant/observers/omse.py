"""The OMSE observer (FQ-ViT): per group, the clipping range with the least quantization MSE."""

from __future__ import annotations

import torch

from fxquant.quant.observers.base import range_to_scale_zero_point, shrink_factors
from fxquant.quant.observers.minmax import MinMaxObserver
from fxquant.quant.observers.registry import register_observer
from fxquant.quant.progress import work_bar
from fxquant.quant.qparams import QParams
from fxquant.quant.quantizers import fake_quantize
from fxquant.quant.spec import QuantSpec

__all__ = ["OmseObserver"]


@register_observer("omse")
class OmseObserver(MinMaxObserver):
    """FQ-ViT's OMSE: pick per group the clipping range minimising the quantization MSE.

    Keeps the running min/max plus a bounded, deterministic subsample of the calibration
    values (at most ``omse_group_samples`` = 2**16 per group and ``omse_total_samples`` =
    2**20 in all; seeded by ``omse_seed`` = 0). At compute time it tries ``omse_steps`` =
    100 shrink factors 1, 0.99, ..., 0.01 of the min/max range (at most 2000, see
    ``fxquant.quant.qconfig_spec``) and keeps, per group, the one whose fake-quantized sample has the
    smallest squared error; each factor is scored for all groups at once, in one reused
    buffer. Factor 1.0 is tried first and ties keep the earlier factor, so the result is
    never worse than min-max on the sample.
    """

    @classmethod
    def check_spec(cls, spec: QuantSpec) -> None:
        if spec.method == "log_adaptive":
            raise ValueError(
                "observer omse searches the range for a fixed grid; quantization_method log_adaptive chooses "
                "its base on the calibration data instead: use observer_type MinmaxObserver with it"
            )
        super().check_spec(spec)

    def __init__(self, spec: QuantSpec, **kw):
        super().__init__(spec, **kw)
        self.steps = int(spec.option("omse_steps", 100))
        self.group_cap = int(spec.option("omse_group_samples", 2**16))
        self.total_cap = int(spec.option("omse_total_samples", 2**20))
        self._gen = torch.Generator().manual_seed(int(spec.option("omse_seed", 0)))
        self.sample: torch.Tensor | None = None  # (G, S) on the data's device
        self.keys: torch.Tensor | None = None  # (S,) float64 on CPU, larger = kept

    def _observe(self, x, lo, hi):
        super()._observe(x, lo, hi)
        xg = self._grouping.matrix(x)
        g, m = xg.shape
        cap = max(1, min(self.group_cap, self.total_cap // g))
        if m <= cap:
            cols, weight = xg.to(torch.float32, copy=True), 1.0
        else:  # uniform columns, with replacement: cheap for any m
            idx = torch.randint(m, (cap,), generator=self._gen)
            cols, weight = xg[:, idx.to(xg.device)].float(), m / cap
        # Weighted reservoir (Efraimidis-Spirakis, log keys): each kept column stands for
        # ``weight`` values, so batches of different sizes are represented fairly.
        keys = torch.rand(cols.shape[1], generator=self._gen, dtype=torch.float64).log_().div_(weight)
        if self.sample is not None:
            cols, keys = torch.cat([self.sample, cols], 1), torch.cat([self.keys, keys])
        if keys.numel() > cap:
            keep = keys.topk(cap).indices
            cols, keys = cols[:, keep.to(cols.device)], keys[keep]
        self.sample, self.keys = cols, keys

    def _range(self):
        lo, hi, s = self.min, self.max, self.sample
        factors = shrink_factors(self.steps).to(lo.device)
        errors = torch.empty(self.steps, lo.numel(), dtype=s.dtype, device=s.device)
        buf = torch.empty_like(s)  # one scratch buffer for every factor: no allocation per step
        qmin, qmax = self.spec.qmin, self.spec.qmax
        with work_bar(self.steps, self.steps * s.numel(), f"OMSE {self.name}") as bar:
            for i, f in enumerate(factors):
                scale, zp = range_to_scale_zero_point(lo * f, hi * f, self.spec)
                if self.spec.method == "uniform":  # fake_quantize's ops, in place on buf
                    scale, zp = scale[:, None], zp[:, None]
                    torch.div(s, scale, out=buf).round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)
                else:
                    buf.copy_(fake_quantize(s, QParams(scale, zp, qmin, qmax, axis=0), self.spec.method))
                torch.sum(buf.sub_(s).pow_(2), 1, out=errors[i])
                bar.update(1)
        best = errors.argmin(0)  # the first minimum: factor 1.0 first, ties keep the earlier
        return lo * factors[best], hi * factors[best]

    def state(self):
        return {**super().state(), "sample": self.sample, "sample_keys": self.keys}
