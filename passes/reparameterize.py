"""reparameterize: per-channel quantization of post-LayerNorm activations, run on a per-tensor
grid (RepQ-ViT's scale reparameterization), folded into LayerNorm and the next Linears.

A LayerNorm output feeding Linears (norm1 -> Q/K/V, norm2 -> fc1) has channels with very
different ranges, but an integer GEMM needs one scale and zero point for its whole input.
For an affine b-bit point, this pass measures each channel's range on the calibration data
and gives channel c its own grid: scale ``s_c = (max_c - min_c) / (2**b - 1)`` and zero point
``z_c = round(-min_c / s_c)``. With ``s~ = mean(s)``, ``z~ = round(mean(z))``,
``r1 = s / s~`` and ``r2 = z - z~``, the LayerNorm's gamma and beta become ``gamma / r1`` and
``(beta + s * r2) / r1`` and each Linear after it gets ``W diag(r1)`` and
``b - W (s * r2)``: the FP32 output is unchanged, and every channel of the new LayerNorm
output spans the same range ``[-s~ z~, s~ (2**b - 1 - z~)]``, so a per-tensor (min-max) grid
on it quantizes each channel exactly as its own per-channel grid would. SmoothQuant
(``smooth``) moves scales only; this also moves the offsets.

Runs after ``split_qkv`` (and ``rotate``) and before ``smooth`` and the observers, when the
qconfig says ``reparameterize: true``; points that are symmetric, not uniform or not per
tensor are left as they are, with a note. Neutral in FP32 (float rounding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxquant.errors import FxqError
from fxquant.infra.contracts import Contract, Prop
from fxquant.infra.pass_manager import Pass, PassContext
from fxquant.ir.meta import ORIGIN, ORIGIN_SLICE, POINT
from fxquant.ir.patterns import reads_shape_only, submodule
from fxquant.quant import distributed
from fxquant.quant.calib_data import as_batches, iter_batches


def _candidates(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[fx.Node, list]]:
    pairs = []
    for node in gm.graph.nodes:
        norm = submodule(gm, node)
        point = node.meta.get(POINT)
        if not isinstance(norm, nn.LayerNorm) or point is None:
            continue
        consumers = [u for u in node.users if not reads_shape_only(u)]
        if not consumers or any(
            not isinstance(submodule(gm, c), nn.Linear) or c.args[0] is not node for c in consumers
        ):
            continue
        spec = point.spec
        symmetric = spec.signed if spec.symmetric is None else spec.symmetric
        if spec.method != "uniform" or spec.granularity != "layer_wise" or symmetric or not norm.elementwise_affine:
            ctx.note(f"{node.name}: not reparameterized (needs an affine per-tensor uniform point, affine LayerNorm)")
            continue
        pairs.append((node, consumers))
    return pairs


class _RangeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: set[str]):
        super().__init__(gm)
        self.watched = watched
        self.low: dict[str, torch.Tensor] = {}
        self.high: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.watched:
            flat = value.detach().reshape(-1, value.shape[-1])
            low, high = flat.amin(dim=0), flat.amax(dim=0)
            self.low[n.name] = low if n.name not in self.low else torch.minimum(self.low[n.name], low)
            self.high[n.name] = high if n.name not in self.high else torch.maximum(self.high[n.name], high)
        return value


def channel_grids(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel affine grids (scale, zero point) covering [min(low, 0), max(high, 0)]."""
    levels = 2**bits - 1
    low, high = low.double().clamp(max=0.0), high.double().clamp(min=0.0)
    scale = ((high - low) / levels).clamp_min(1e-8)
    return scale, torch.round(-low / scale).clamp(0, levels)


def fold(norm: nn.LayerNorm, linears: list, scale: torch.Tensor, zero: torch.Tensor) -> tuple[float, float]:
    """Fold the reparameterization into ``norm`` and ``linears``; returns (s~, z~)."""
    mean_scale, mean_zero = scale.mean(), torch.round(zero.mean())
    r1, r2 = scale / mean_scale, zero - mean_zero
    shift = scale * r2
    with torch.no_grad():
        gamma = norm.weight.double()
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(gamma)
        norm.weight.copy_((gamma / r1).to(norm.weight.dtype))
        new_beta = ((beta + shift) / r1).to(norm.weight.dtype)
        if norm.bias is None:
            norm.bias = nn.Parameter(new_beta)
        else:
            norm.bias.copy_(new_beta)
        for linear in linears:
            w = linear.weight.double()
            bias = (linear.bias.double() if linear.bias is not None else 0.0) - w @ shift
            linear.weight.copy_((w * r1[None, :]).to(linear.weight.dtype))
            if linear.bias is None:
                linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
            else:
                linear.bias.copy_(bias.to(linear.bias.dtype))
    return float(mean_scale), float(mean_zero)


class Reparameterize(Pass):
    name = "reparameterize"
    neutral = True
    contract = Contract(
        requires={Prop.ANNOTATED, Prop.QKV_SPLIT},
        provides={Prop.REPARAMETERIZED},
        excludes={Prop.SMOOTHED, Prop.OBSERVED},
    )

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not ctx.qconfig.recovery.get("reparameterize"):
            return
        data = ctx.calib_data
        if data is None:
            raise FxqError("reparameterize needs calib_data: an iterable of image batches")
        if iter(data) is data:
            raise FxqError(
                "reparameterize and calibrate each go over calib_data, so it must be read more than once: "
                "pass a list, a tensor or a DataLoader, not a generator"
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if not ctx.qconfig.recovery.get("reparameterize"):
            return gm
        pairs = _candidates(gm, ctx)
        if not pairs:
            return gm
        recorder = _RangeRecorder(gm, {norm.name for norm, _ in pairs})
        with torch.no_grad():
            for batch in iter_batches(as_batches(ctx.calib_data)):
                recorder.run(batch)
        for norm_node, consumers in pairs:
            ctx.current_node = norm_node.name
            low = -distributed.all_reduce_max(-recorder.low[norm_node.name])
            high = distributed.all_reduce_max(recorder.high[norm_node.name])
            scale, zero = channel_grids(low, high, norm_node.meta[POINT].spec.bits)
            mean_scale, mean_zero = fold(submodule(gm, norm_node), [submodule(gm, c) for c in consumers], scale, zero)
            norm_node.meta[ORIGIN] = f"{norm_node.name}@reparameterize"
            norm_node.meta.pop(ORIGIN_SLICE, None)
            ctx.note(
                f"{norm_node.name}: per-channel grids on one scale {mean_scale:.3g} / zero point {mean_zero:.0f} "
                f"(channel scales {float(scale.min()):.3g}..{float(scale.max()):.3g}), folded into "
                f"{[c.name for c in consumers]}"
            )
        return gm
