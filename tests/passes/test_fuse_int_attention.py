"""fuse_int_attention: each attention core of the oneDNN integer graph becomes one kernel.

Before: the tiny ViT lowered with ``backend="int", int_kernels="onednn"`` up to
``use_onednn_kernels`` (q @ kT as an IntMatmul, a DequantizeCodes, the softmax, a float
matmul with the dequantized V). Expected: one ``IntAttention`` per block, no IntMatmul,
softmax or attn@V matmul left; the output equal to the unfused graph's up to float32
rounding; codes at every remaining point equal to the fake-quant graph's or 1 LSB off on a
small fraction; Swin (relative position bias before the softmax) and FQ-ViT (log2
probabilities) left as they are; the C++ kernel equal to its torch definition on random
shapes, strides and code types; without the kernel, nothing fused and the reason reported.
Under torch.compile: test_use_onednn_kernels compiles the same fused ViT graph, with and
without inductor freezing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.analysis.code_agreement import code_agreement
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.passes import FuseIntAttention
from fxquant.pipeline import default_passes
from fxquant.runtime.int_attention import CONSTANTS, IntAttention, load_kernel, per_head
from fxquant.runtime.int_lis_attention import IntLisAttention
from fxquant.runtime.int_modules import IntMatmul
from fxquant.runtime.onednn import onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="the oneDNN integer graph needs an x86 torch build")

MAX_OFF_BY_ONE_SHARE = 1e-3  # as for the other integer passes


def _kernel_or_skip():
    if not load_kernel():
        from fxquant.runtime.int_attention import kernel_error

        pytest.skip(f"the fused attention kernel could not be built here: {kernel_error()}")


def _modules(gm, cls):
    return {name: m for name, m in gm.named_modules() if isinstance(m, cls)}


@pytest.fixture(scope="module")
def graphs():
    """(tiny, fake graph, unfused oneDNN graph, fused oneDNN graph) for the tiny ViT under w8a8."""
    from tests.passes.conftest import tiny_model

    _kernel_or_skip()
    tiny = tiny_model("vit")
    kwargs = dict(calib_data=tiny.calib(batches=2, batch_size=4), diff_inputs=tiny.inputs(), progress=False)
    fake = fxquant.compile(tiny.model, "w8a8", **kwargs)
    unfused = fxquant.compile(tiny.model, "w8a8", backend="int", passes=default_passes("int", "onednn")[:-1], **kwargs)
    fused = fxquant.compile(tiny.model, "w8a8", backend="int", int_kernels="onednn", **kwargs)
    return tiny, fake, unfused, fused


def test_every_attention_core_becomes_one_module(graphs):
    tiny, _, unfused, fused = graphs
    attentions = _modules(fused, IntAttention)
    assert len(attentions) == tiny.depth == len(_modules(unfused, IntMatmul))
    assert not _modules(fused, IntMatmul)
    assert not any(n.op in ("call_method", "call_function") and "softmax" in str(n.target) for n in fused.graph.nodes)
    assert not any("matmul" in str(n.target) for n in fused.graph.nodes if n.op == "call_function")
    for module in attentions.values():
        assert module.head_constants.shape == (2, len(CONSTANTS))  # the tiny ViT's 2 heads
    note = next(n for n in fused.report.notes if n.startswith("fuse_int_attention"))
    assert f"{tiny.depth} attention cores" in note and f"({tiny.depth} integer matmuls examined)" in note


def test_output_equals_the_unfused_graph(graphs):
    tiny, fake, unfused, fused = graphs
    x = tiny.image(3, seed=5)
    with torch.no_grad():
        before, after, reference, fake_out = unfused(x), fused(x), tiny.model(x), fake(x)
    assert output_qsnr(before, after) > 40.0
    assert abs(output_qsnr(reference, after) - output_qsnr(reference, fake_out)) < 0.5


def test_codes_at_the_remaining_points_match_the_fake_quant_graph(graphs):
    tiny, fake, unfused, fused = graphs
    rows = code_agreement(fake, fused, tiny.inputs(), isolated=True)
    # every point but the scores (inside the kernel) is still compared
    assert len(rows) == len(code_agreement(fake, unfused, tiny.inputs(), isolated=True)) - tiny.depth
    assert not any(r.label == "attn_kv_out" for r in rows)
    assert max(r.worst for r in rows) <= 1
    assert sum(r.off_by_one for r in rows) <= MAX_OFF_BY_ONE_SHARE * sum(r.codes for r in rows)


def test_equivalence_is_measured_once_on_the_fused_graph(graphs):
    tiny, fake, _, fused = graphs
    notes = fused.report.notes
    assert sum(n.startswith("integer vs fake-quant codes") for n in notes) == 2
    line = next(n for n in notes if n.startswith("output QSNR on the diff inputs"))
    with torch.no_grad():
        measured = output_qsnr(fake(*tiny.inputs()), fused(*tiny.inputs()))
    assert f"integer vs fake-quant {measured:.2f} dB" in line


def test_torch_fallback_computes_the_same(graphs, monkeypatch):
    tiny, _, _, fused = graphs
    x = tiny.image(2, seed=7)
    with torch.no_grad():
        kernel = fused(x)
        monkeypatch.setattr("fxquant.runtime.int_attention._Kernel.ready", False)
        fallback = fused(x)
    assert output_qsnr(fallback, kernel) > 60.0


def test_saved_fused_graph_loads_and_runs(graphs, tmp_path):
    tiny, _, _, fused = graphs
    fxquant.save(fused, tmp_path / "fused.safetensors")
    loaded = fxquant.load(tmp_path / "fused.safetensors")
    assert len(_modules(loaded, IntAttention)) == tiny.depth
    x = tiny.image(1, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, qconfig, why",
    [("swin", "w8a8", "other than a softmax|not read by one multiply-add"), ("vit", "fqvit_w8a8", None)],
)
def test_attention_with_a_bias_or_log2_probabilities_stays_unfused(name, qconfig, why):
    from tests.passes.conftest import tiny_model

    _kernel_or_skip()
    tiny = tiny_model(name)
    qm = fxquant.compile(
        tiny.model,
        qconfig,
        calib_data=tiny.calib(),
        diff_inputs=tiny.inputs(),
        backend="int",
        int_kernels="onednn",
        progress=False,
    )
    assert not _modules(qm, IntAttention)
    skipped = [n for n in qm.report.notes if n.startswith("unfused attention")]
    if why is None:  # FQ-ViT: log2 probabilities fuse into IntLisAttention instead (tests/test_int_kernels.py)
        assert not skipped and len(_modules(qm, IntLisAttention)) == tiny.depth
    else:
        import re

        assert skipped and all(re.search(why, n) for n in skipped)


def test_without_the_kernel_nothing_is_fused_and_the_report_says_why(monkeypatch):
    from tests.passes.conftest import tiny_model

    monkeypatch.setattr("fxquant.runtime.int_attention._Kernel.tried", True)
    monkeypatch.setattr("fxquant.runtime.int_attention._Kernel.ready", False)
    monkeypatch.setattr("fxquant.runtime.int_attention._Kernel.error", "no C++ compiler (test)")
    tiny = tiny_model("vit")
    qm = fxquant.compile(
        tiny.model, "w8a8", calib_data=tiny.calib(), backend="int", int_kernels="onednn", progress=False
    )
    assert not _modules(qm, IntAttention) and _modules(qm, IntMatmul)
    assert any("left unfused: no C++ compiler (test)" in n for n in qm.report.notes)


# ----------------------------------------------------------------------------- the kernel itself
def _random_case(
    seed: int,
    batch: int,
    heads: int,
    rows: int,
    cols: int,
    depth: int,
    vdim: int,
    q_u8: bool,
    k_u8: bool,
    v_u8: bool,
    layout: str,
):
    g = torch.Generator().manual_seed(seed)

    def codes(shape, unsigned):
        if unsigned:
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)

    if layout == "heads-inner":  # (B, N, H, D) storage read through a permute: what the graph passes
        q = codes((batch, rows, heads, depth), q_u8).permute(0, 2, 1, 3)
        kt = codes((batch, cols, heads, depth), k_u8).permute(0, 2, 3, 1)
        v = codes((batch, cols, heads, vdim), v_u8).permute(0, 2, 1, 3)
    elif layout == "dense":
        q, v = codes((batch, heads, rows, depth), q_u8), codes((batch, heads, cols, vdim), v_u8)
        kt = codes((batch, heads, cols, depth), k_u8).transpose(-2, -1)
    else:  # "columns": the reduced dimensions strided, kT itself contiguous
        q = codes((batch, heads, depth, rows), q_u8).transpose(-2, -1)
        kt = codes((batch, heads, depth, cols), k_u8)
        v = codes((batch, heads, vdim, cols), v_u8).transpose(-2, -1)

    def zero_points(unsigned):
        return torch.randint(100, 156, (heads,), generator=g).float() - (0 if unsigned else 128)

    scale = torch.rand(heads, generator=g) * 0.1 + 0.01
    score_zero = torch.randint(-20, 20, (heads,), generator=g).float()
    constants = torch.stack(
        [
            zero_points(q_u8),
            zero_points(k_u8),
            torch.rand(heads, generator=g) * 2e-4 + 1e-5,
            score_zero,
            scale,
            -score_zero * scale,
            torch.rand(heads, generator=g) * 0.1,
            zero_points(v_u8),
        ],
        dim=1,
    )
    return q, kt, v, constants


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    depth=st.sampled_from([1, 8, 16, 64]),
    vdim=st.sampled_from([1, 8, 32]),
    q_u8=st.booleans(),
    k_u8=st.booleans(),
    v_u8=st.booleans(),
    layout=st.sampled_from(["heads-inner", "dense", "columns"]),
    score_range=st.sampled_from([(-128, 127), (-32, 31), (0, 255)]),
    threads=st.sampled_from([1, 2]),
)
def test_kernel_equals_its_torch_definition(
    seed, batch, heads, rows, cols, depth, vdim, q_u8, k_u8, v_u8, layout, score_range, threads
):
    _kernel_or_skip()
    q, kt, v, constants = _random_case(seed, batch, heads, rows, cols, depth, vdim, q_u8, k_u8, v_u8, layout)
    module = IntAttention(constants, *score_range)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: (batch, head) tasks on two threads, GEMMs inside the parallel region
    try:
        got = module(q, kt, v)
    finally:
        torch.set_num_threads(before)
    want = module.reference(q, kt, v)
    assert got.shape == want.shape == (batch, heads, rows, vdim)
    # the score codes are computed with the same float32 arithmetic; softmax and attn@V round differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_few_heads_are_split_into_row_blocks_with_the_same_result(threads):
    """Batch 1, one head, 150 query rows: on 2 threads the kernel splits the rows into blocks."""
    _kernel_or_skip()
    q, kt, v, constants = _random_case(5, 1, 1, 150, 97, 64, 32, True, True, True, "heads-inner")
    module = IntAttention(constants, -128, 127)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = module(q, kt, v)
    finally:
        torch.set_num_threads(before)
    want = module.reference(q, kt, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_k_and_v_shared_across_heads_are_broadcast():
    _kernel_or_skip()
    q, kt, v, constants = _random_case(4, 2, 3, 6, 5, 8, 4, True, False, True, "dense")
    module = IntAttention(constants, -128, 127)
    shared_kt, shared_v = kt[:, :1], v[:1, :1]
    want = module.reference(q, shared_kt.expand_as(kt), shared_v.expand_as(v))
    torch.testing.assert_close(module(q, shared_kt, shared_v), want, rtol=1e-5, atol=1e-6)


def test_one_set_of_constants_serves_every_head():
    _kernel_or_skip()
    q, kt, v, constants = _random_case(3, 2, 3, 9, 11, 16, 8, True, True, True, "heads-inner")
    shared = IntAttention(constants[:1], -128, 127)
    expanded = IntAttention(constants[:1].expand(3, -1), -128, 127)
    torch.testing.assert_close(shared(q, kt, v), expanded(q, kt, v), rtol=0, atol=0)


def test_kernel_refuses_bad_inputs_with_a_message():
    _kernel_or_skip()
    q, kt, v, constants = _random_case(1, 1, 2, 5, 6, 8, 4, True, True, True, "dense")
    op = torch.ops.fxquant_kernels.int_attention
    with pytest.raises(RuntimeError, match="q must hold int8 or uint8 codes"):
        op(q.float(), kt, v, constants, -128, 127)
    with pytest.raises(RuntimeError, match="v must be"):
        op(q, kt, v[:, :, :3], constants, -128, 127)
    with pytest.raises(RuntimeError, match="consts must be float32"):
        op(q, kt, v, constants[:, :5], -128, 127)
    with pytest.raises(RuntimeError, match="negative score scale"):
        op(q, kt, v, constants * torch.tensor([1, 1, 1, 1, -1, 1, 1, 1.0]), -128, 127)


def test_constants_must_be_one_per_head():
    assert per_head(torch.ones(1, 4, 1, 1), 4, "x").shape == (4,)
    assert per_head(torch.tensor(2.0), 4, "x").shape == (1,)
    with pytest.raises(ValueError, match="not one value per head"):
        per_head(torch.ones(1, 1, 1, 7), 4, "x")
    with pytest.raises(ValueError, match="has 3 values"):
        per_head(torch.ones(3, 1, 1), 4, "x")
    with pytest.raises(ValueError, match="must not be negative"):
        IntAttention(torch.tensor([[0, 0, 1, 0, -1.0, 0, 1, 0]]), -128, 127)


def test_pass_needs_an_integer_graph():
    from fxquant.errors import NodeError
    from tests.passes.conftest import tiny_model

    tiny = tiny_model("vit")
    fake = fxquant.compile(tiny.model, "w8a8", calib_data=tiny.calib(), progress=False)
    with pytest.raises(NodeError, match="run lower_integer first"):
        FuseIntAttention().requires(fake, None)


def test_fused_module_equals_the_ops_it_replaced_on_their_own_inputs(graphs):
    """Each IntAttention against the unfused graph's q, kT, V codes and attn@V output (same
    calibration, same node names): only float32 rounding of softmax and attn@V differs."""
    from fxquant.analysis.numeric_diff import capture_values

    tiny, _, unfused, fused = graphs
    x = tiny.image(2, seed=11)
    values = capture_values(unfused, (x,))
    nodes = [
        n
        for n in fused.graph.nodes
        if isinstance(fused.get_submodule(str(n.target)) if n.op == "call_module" else None, IntAttention)
    ]
    assert len(nodes) == tiny.depth
    for node in nodes:
        module = fused.get_submodule(str(node.target))
        replaced = str(node.target)[len("fxq_") : -len("_attention")]  # the attn@V matmul it took the place of
        q, kt, v = (values[arg.name] for arg in node.args)
        assert {q.dtype, kt.dtype, v.dtype} <= {torch.int8, torch.uint8}  # codes, as the oneDNN Linears emit them
        with torch.no_grad():
            torch.testing.assert_close(module(q, kt, v), values[replaced], rtol=1e-5, atol=1e-6)


def _fuse_alone(gm, tiny):
    from fxquant.infra.pass_manager import PassContext

    ctx = PassContext(qconfig=None, reference=gm, diff_inputs=tiny.inputs())
    gm = FuseIntAttention().run(gm, ctx)  # run by hand: its notes go to ctx.record
    return gm, ctx.record.notes


def test_dropout_on_the_probabilities_keeps_that_attention_unfused(graphs):
    import copy

    tiny, _, unfused, _ = graphs
    gm = copy.deepcopy(unfused)
    gm.get_submodule("blocks.0.attn.attn_drop").p = 0.1
    gm, notes = _fuse_alone(gm, tiny)
    assert len(_modules(gm, IntAttention)) == tiny.depth - 1
    assert any("not the left operand of a matmul" in n for n in notes if n.startswith("unfused attention"))


def test_a_second_reader_of_the_probabilities_keeps_that_attention_unfused(graphs):
    import copy

    tiny, _, unfused, _ = graphs
    gm = copy.deepcopy(unfused)
    softmax = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax"][-1]
    with gm.graph.inserting_after(softmax):
        gm.graph.call_function(torch.mean, (softmax,))
    gm.recompile()
    gm, notes = _fuse_alone(gm, tiny)
    assert len(_modules(gm, IntAttention)) == tiny.depth - 1
    assert any("more than one reader" in n for n in notes if n.startswith("unfused attention"))


def test_a_module_from_elsewhere_loads_the_kernel_when_unpickled(tmp_path):
    """A fresh process that gets an IntAttention without fxquant.load (torch.load of the
    module) has the kernel loaded by unpickling, so a first call under torch.compile sees it."""
    import subprocess
    import sys

    _kernel_or_skip()
    q, kt, v, constants = _random_case(2, 1, 2, 4, 4, 8, 4, True, True, True, "dense")
    module = IntAttention(constants, -128, 127)
    path = tmp_path / "case.pt"
    torch.save({"module": module, "args": (q, kt, v), "want": module(q, kt, v)}, path)
    script = (
        "import torch, fxquant.runtime.int_attention as ia\n"
        f"case = torch.load({str(path)!r}, weights_only=False)\n"
        "assert ia.kernel_ready()\n"
        "got = case['module'](*case['args'])\n"
        "torch.testing.assert_close(got, case['want'], rtol=0, atol=0)\n"
        "print('ready', ia.kernel_ready())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ready True" in result.stdout


def test_needs_build_says_when_the_kernel_must_be_compiled(tmp_path):
    """What fuse_int_attention's progress line relies on: True in a fresh process with an empty
    extension cache, False once the kernel is loaded."""
    import os
    import subprocess
    import sys

    from fxquant.runtime.int_attention import needs_build

    _kernel_or_skip()
    assert not needs_build()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "empty")}
    result = subprocess.run(
        [sys.executable, "-c", "import fxquant.runtime.int_attention as ia; print(ia.needs_build())"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")


@pytest.mark.parametrize(
    "shape",
    [(0, 2, 5, 8, 4), (1, 2, 0, 8, 4), (1, 2, 5, 0, 4), (1, 2, 5, 8, 0)],
    ids=["no-batch", "no-rows", "no-depth", "no-value-columns"],
)
def test_empty_dimensions_give_what_torch_gives(shape):
    _kernel_or_skip()
    batch, heads, rows, depth, vdim = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (batch, heads, rows, depth), dtype=torch.uint8, generator=g)
    kt = torch.randint(0, 256, (batch, heads, depth, 6), dtype=torch.uint8, generator=g)
    v = torch.randint(0, 256, (batch, heads, 6, vdim), dtype=torch.uint8, generator=g)
    constants = torch.tensor([[128, 128, 1e-3, 0, 0.05, 0, 0.1, 128]]).expand(heads, -1)
    module = IntAttention(constants, -128, 127)
    got, want = module(q, kt, v), module.reference(q, kt, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unequal_batch_dimensions_are_refused_by_the_batched_int8_matmul():
    a = torch.zeros(2, 2, 5, 8, dtype=torch.int8)
    b = torch.zeros(1, 2, 8, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="equal batch dimensions"):
        torch.ops.fxquant.int8_bmm_sums(a, b)
