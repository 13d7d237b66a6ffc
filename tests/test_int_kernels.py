"""The C++ kernels of the full-integer presets against their torch references (exact equality):
Log-Int-Softmax + attn@V (``LisShiftMatmul``), integer LayerNorm (``IntLayerNorm``), code
tables (``CodeLut``); the modules' torch fallback; and the integer graphs of ``fqvit_w8a8``
and ``int8_all`` on a tiny ViT giving the same outputs with and without the kernels."""

from __future__ import annotations

import pytest
import timm
import torch

import fxquant
from fxquant.quant.ptf import ptf_layernorm_constants
from fxquant.quant.qparams import QParams
from fxquant.runtime import code_lut, fast_codes, int_layernorm, int_lis_attention, log_int_softmax
from fxquant.runtime.code_lut import CodeLut, code_table
from fxquant.runtime.fast_codes import DequantizeAdd, fast_dequantize, fast_quantize
from fxquant.runtime.int_attention import load_kernel
from fxquant.runtime.int_layernorm import IntLayerNorm
from fxquant.runtime.int_lis_attention import IntLisAttention
from fxquant.runtime.int_modules import DequantizeCodes, QuantizeCodes
from fxquant.runtime.integer import dequantize_codes, exact_shift_matmul_bound, quantize_codes
from fxquant.runtime.log_int_softmax import LisShiftMatmul
from tests.tiny import TINY_VIT, images

needs_kernel = pytest.mark.skipif(not load_kernel(), reason="the fxquant_kernels extension cannot be built here")


def _lis_case(seed: int, per_head: bool, renormalize: bool, v_uint8: bool, tokens: int = 37, vdim: int = 12):
    g = torch.Generator().manual_seed(seed)
    heads = 3
    scale = torch.rand(1, heads, 1, 1, generator=g) * 0.3 + 0.01 if per_head else torch.tensor(0.07)
    scores = torch.randint(-128, 128, (2, heads, 5, tokens), generator=g).float() * scale
    scores[0, 1, 2] *= 3.7  # off the codes' grid: the rounding of scores / scale matters
    v_zero = torch.randint(-20, 20, (1, heads, 1, 1), generator=g).double() if per_head else torch.tensor(3.0).double()
    v_scale = (torch.rand(1, heads, 1, 1, generator=g) * 0.1).double() if per_head else torch.tensor(0.02).double()
    v = torch.randint(-128, 128, (2, tokens, heads, vdim), generator=g, dtype=torch.int8).permute(0, 2, 1, 3)
    shift = exact_shift_matmul_bound(tokens, 150, 254)
    module = LisShiftMatmul(scale, 8, renormalize, v_scale, v_zero, shift)
    if v_uint8:
        module.input_to_uint8(1)
        v = (v.to(torch.int16) + 128).to(torch.uint8)
    return module, scores, v


@needs_kernel
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "per_head,renormalize,v_uint8", [(True, True, False), (False, False, True), (True, True, True)]
)
def test_lis_kernel_equals_torch_reference(seed, per_head, renormalize, v_uint8):
    module, scores, v = _lis_case(seed, per_head, renormalize, v_uint8, tokens=29 + 8 * seed)
    out = module(scores, v)
    assert module._kernel_args[1] is not None  # the kernel ran, not the fallback
    assert torch.equal(out, module.reference(scores, v))


@needs_kernel
def test_lis_kernel_gives_nan_rows_for_non_finite_scores():
    module, scores, v = _lis_case(0, True, True, False)
    scores[1, 0, 3, 4] = float("nan")
    scores[1, 2, 1, 0] = float("inf")
    out = module(scores, v)
    assert out[1, 0, 3].isnan().all() and out[1, 2, 1].isnan().all()
    finite = torch.ones(out.shape[:3], dtype=torch.bool)
    finite[1, 0, 3] = finite[1, 2, 1] = False
    assert torch.equal(out[finite], module.reference(scores, v)[finite])


def test_lis_falls_back_to_torch_without_the_kernel(monkeypatch):
    module, scores, v = _lis_case(1, True, True, False)
    monkeypatch.setattr(log_int_softmax, "load_kernel", lambda: False)
    monkeypatch.setattr(log_int_softmax, "kernel_ready", lambda: False)
    out = module(scores, v)
    assert module._kernel_args == ((3, 12, False), None)
    assert torch.equal(out, module.reference(scores, v))


def _layernorm(seed: int, channels: int, uint8: bool) -> IntLayerNorm:
    g = torch.Generator().manual_seed(seed)
    scale = torch.full((channels,), 0.01) * 2.0 ** torch.randint(0, 4, (channels,), generator=g)
    zero = float(torch.randint(0, 256, (1,), generator=g))
    in_qp = QParams(scale, torch.full((channels,), zero), 0, 255, axis=-1)
    out_qp = QParams(torch.tensor(0.05 + 0.01 * seed), torch.tensor(100.0 + seed), 0, 255)
    weight, bias = torch.rand(channels, generator=g) * 2 - 0.5, torch.randn(channels, generator=g)
    module = IntLayerNorm(ptf_layernorm_constants(in_qp, weight, bias, 1e-6, out_qp), 128, 128)
    if uint8:
        module.to_uint8()
    return module


@needs_kernel
@pytest.mark.parametrize("channels,uint8", [(48, False), (768, True), (7, False), (1, True)])
def test_layernorm_kernel_equals_torch_reference(channels, uint8):
    module = _layernorm(channels, channels, uint8)
    codes = torch.randint(-128, 128, (3, 17, channels), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    codes[0, 0] = codes[0, 0, :1]  # a constant row: variance 0, sigma clamped to 1
    out = module(codes)
    assert out.dtype == (torch.uint8 if uint8 else torch.int8)
    assert torch.equal(out, module.reference(codes))


def test_layernorm_falls_back_to_torch_without_the_kernel(monkeypatch):
    module = _layernorm(2, 32, False)
    codes = torch.randint(-128, 128, (4, 32), dtype=torch.int8)
    expected = module.reference(codes)
    monkeypatch.setattr(int_layernorm, "kernel_ready", lambda: False)
    monkeypatch.setattr(int_layernorm, "load_kernel", lambda: False)
    assert torch.equal(module(codes), expected)


@pytest.mark.parametrize("channels", [1, 6])
@pytest.mark.parametrize("in_uint8,out_uint8", [(False, False), (True, True), (False, True)])
def test_code_lut_matches_dequantize_gelu_quantize(monkeypatch, channels, in_uint8, out_uint8):
    g = torch.Generator().manual_seed(channels)
    shape = (1, 1, channels)
    dequantize = DequantizeCodes("in", torch.rand(shape, generator=g) * 0.05 + 0.01, torch.full(shape, 3.0))
    quantize = QuantizeCodes("out", torch.tensor(0.02), torch.tensor(-100.0), -128, 127)
    lut = CodeLut(code_table(dequantize, torch.nn.GELU(), quantize, False, channels), -128, 127, False, False)
    if in_uint8:
        lut.input_to_uint8()
    if out_uint8:
        lut.to_uint8()
    codes = torch.randint(-128, 128, (5, 9, channels), generator=g, dtype=torch.int8)
    expected = quantize(torch.nn.functional.gelu(dequantize(codes)))
    given = (codes.to(torch.int16) + 128).to(torch.uint8) if in_uint8 else codes
    want = (expected.to(torch.int16) + 128).to(torch.uint8) if out_uint8 else expected
    assert torch.equal(lut.reference(given), want)
    if load_kernel():
        assert torch.equal(lut(given), want)
    monkeypatch.setattr(code_lut, "kernel_ready", lambda: False)
    monkeypatch.setattr(code_lut, "load_kernel", lambda: False)
    assert torch.equal(lut(given), want)


def _without_kernels(monkeypatch) -> None:
    for module in (log_int_softmax, int_layernorm, code_lut, int_lis_attention):
        monkeypatch.setattr(module, "kernel_ready", lambda: False)
        monkeypatch.setattr(module, "load_kernel", lambda: False)
    monkeypatch.setattr(fast_codes, "kernel_ready", lambda: False)


@needs_kernel
@pytest.mark.parametrize("qconfig", ["fqvit_w8a8", "int8_all"])
def test_full_integer_graphs_same_outputs_with_and_without_kernels(monkeypatch, qconfig):
    """The kernels change no output of the integer graph: the torch references are the
    arithmetic these graphs ran before the kernels existed."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    qm = fxquant.compile(
        model, qconfig, calib_data=images(8, 32), backend="int", int_kernels="portable", progress=False
    )
    kinds = {type(m).__name__ for m in qm.modules()}
    assert {"IntLayerNorm", "LisShiftMatmul"} <= kinds
    if qconfig == "int8_all":
        assert "CodeLut" in kinds and "GELU" not in kinds
    x = images(3, 32, seed=9)
    with torch.no_grad():
        fast = qm(x)
        _without_kernels(monkeypatch)
        for m in qm.modules():
            if isinstance(m, LisShiftMatmul):
                m._kernel_args = None
        slow = qm(x)
    assert torch.equal(fast, slow)


def _lis_attention(seed: int, uint8: bool, per_head: bool):
    g = torch.Generator().manual_seed(seed)
    heads, tokens, depth, vdim = 3, 23 + seed, 16, 8
    q = torch.randint(-128, 128, (2, heads, tokens, depth), generator=g, dtype=torch.int8)
    kt = torch.randint(-128, 128, (2, heads, depth, tokens), generator=g, dtype=torch.int8)
    v = torch.randint(-128, 128, (2, heads, tokens, vdim), generator=g, dtype=torch.int8)
    zero = torch.randint(-5, 5, (heads if per_head else 1, 2), generator=g).float() + (128 if uint8 else 0)
    multiplier = torch.rand(heads if per_head else 1, 1, generator=g) * 2e-4 + 5e-5
    constants = torch.cat([zero, multiplier, torch.full_like(multiplier, -7.0)], dim=1)
    grid = torch.rand(1, heads, 1, 1, generator=g) * 0.2 + 0.01 if per_head else torch.tensor(0.05)
    v_zero = torch.tensor(2.0 + (128 if uint8 else 0)).double()
    module = IntLisAttention(constants, -128, 127, grid, 8, True, torch.tensor(0.03).double(), v_zero, 40)
    if uint8:
        q, kt, v = ((t.to(torch.int16) + 128).to(torch.uint8) for t in (q, kt, v))
    return module, q, kt, v


@needs_kernel
@pytest.mark.parametrize("seed,uint8,per_head", [(0, False, True), (1, True, True), (2, True, False)])
def test_lis_attention_kernel_equals_torch_reference(seed, uint8, per_head):
    module, q, kt, v = _lis_attention(seed, uint8, per_head)
    out = module(q, kt, v)
    assert module._kernel_args[1] is not None
    assert torch.equal(out, module.reference(q, kt, v))


def test_lis_attention_falls_back_to_torch_without_the_kernel(monkeypatch):
    module, q, kt, v = _lis_attention(3, True, True)
    expected = module.reference(q, kt, v)
    monkeypatch.setattr(int_lis_attention, "kernel_ready", lambda: False)
    monkeypatch.setattr(int_lis_attention, "load_kernel", lambda: False)
    module._kernel_args = None
    assert torch.equal(module(q, kt, v), expected)


@needs_kernel
@pytest.mark.parametrize("qconfig", ["fqvit_w8a8", "int8_all"])
def test_onednn_full_integer_attention_fuses_with_the_same_outputs(monkeypatch, qconfig):
    """int_kernels='onednn': fuse_int_attention turns q@kT -> dequantize -> LisShiftMatmul into one
    IntLisAttention, with the same codes as the fake-quant graph and the same output as its torch
    fallback (the unfused modules' arithmetic
    and the torch references)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    qm = fxquant.compile(model, qconfig, calib_data=images(8, 32), backend="int", int_kernels="onednn", progress=False)
    fused = [m for m in qm.modules() if isinstance(m, IntLisAttention)]
    assert len(fused) == TINY_VIT["depth"]
    assert not any(isinstance(m, LisShiftMatmul) for m in qm.modules())
    assert "0 of" in next(n for n in qm.report.notes if n.startswith("integer vs fake-quant codes"))
    x = images(3, 32, seed=9)
    with torch.no_grad():
        fast = qm(x)
        _without_kernels(monkeypatch)  # every fused attention runs reference()
        assert torch.equal(fast, qm(x))


@needs_kernel
@pytest.mark.parametrize("channels,per_channel,uint8", [(48, False, False), (48, True, True), (5, True, False)])
def test_quantize_and_dequantize_kernels_equal_the_torch_ops(channels, per_channel, uint8):
    g = torch.Generator().manual_seed(channels)
    shape = (1, 1, channels) if per_channel else ()
    scale = torch.rand(shape, generator=g) * 0.1 + 0.01
    zero = torch.randint(-10, 10, shape, generator=g).float() + (128 if uint8 else 0)
    qmin, qmax = (0, 255) if uint8 else (-128, 127)
    x = torch.randn(4, 9, channels, generator=g) * 3
    x[0, 0, 0] = 0.5 * float(scale.reshape(-1)[0])  # a tie: rounds half to even
    dtype = torch.uint8 if uint8 else torch.int8
    codes = fast_quantize(x, scale, zero, qmin, qmax, dtype)
    assert codes is not None and torch.equal(codes, quantize_codes(x, scale, zero, qmin, qmax, dtype))
    for post_scale in (1.0, 0.37):
        values = fast_dequantize(codes, scale, zero, post_scale)
        assert values is not None and torch.equal(values, dequantize_codes(codes, scale, zero, post_scale))
    per_head = torch.rand(1, 3, 1, 1, generator=g)  # not one per channel of the last dimension: the torch ops
    assert fast_quantize(torch.randn(2, 3, 4, 5), per_head, per_head, qmin, qmax, dtype) is None


@pytest.mark.parametrize("channels,per_channel,uint8", [(48, False, False), (20, True, True)])
def test_dequantize_add_equals_add_of_the_dequantized_codes(monkeypatch, channels, per_channel, uint8):
    g = torch.Generator().manual_seed(channels)
    shape = (1, 1, channels) if per_channel else ()
    scale = torch.rand(shape, generator=g) * 0.1 + 0.01
    zero = torch.randint(-10, 10, shape, generator=g).float()
    module = DequantizeAdd("proj", scale, zero, 1.0)
    codes = torch.randint(-128, 128, (4, 9, channels), generator=g, dtype=torch.int8)
    x = torch.randn(4, 9, channels, generator=g)
    expected = x + dequantize_codes(codes, scale, zero)
    if uint8:
        module.to_uint8()
        codes = (codes.to(torch.int16) + 128).to(torch.uint8)
    assert torch.equal(module(x, codes), expected)
    monkeypatch.setattr(fast_codes, "kernel_ready", lambda: False)
    assert torch.equal(module(x, codes), expected)
