"""The public entry point: ``fxquant.compile``."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxquant.analysis.equivalence import measure_equivalence
from fxquant.analysis.fallback import keep_most_sensitive
from fxquant.analysis.instruments import GraphDump, NumericDiff, Timing
from fxquant.analysis.numeric_diff import output_qsnr
from fxquant.analysis.weight_bytes import weight_bytes
from fxquant.analysis.weight_coverage import no_activation_warning, weight_coverage
from fxquant.errors import FxqError
from fxquant.infra.contracts import Prop, contract_of
from fxquant.infra.pass_manager import Pass, PassContext, PassManager
from fxquant.infra.records import PassRecord, Report
from fxquant.ir.trace import check_image_input, trace
from fxquant.pipeline import (
    BACKENDS,
    INT_KERNELS,
    default_passes,
    integer_ops_lowered,
    release_setup_tensors,
    resolve_int_kernels,
    split_before,
    stages,
)
from fxquant.quant.calib_data import DIFF_SEED, check_batch, default_diff_inputs, reusable_batches  # noqa: F401
from fxquant.quant.progress import observer_progress
from fxquant.quant.qconfig import QConfigLike, load_qconfig
from fxquant.quant.qconfig_globs import check_globs
from fxquant.runtime.onednn import onednn_available


def compile(  # noqa: A001 - the public name the design card asks for
    model: nn.Module,
    qconfig: QConfigLike = "w8a8",
    *,
    calib_data,
    backend: str = "fake",
    int_kernels: str = "auto",
    diff_inputs: Optional[Sequence[torch.Tensor] | torch.Tensor] = None,
    dump_dir: Optional[str | Path] = None,
    progress: bool = True,
    passes: Optional[Sequence[Pass]] = None,
    model_name: Optional[str] = None,
    keep_float: int = 0,
    numeric_diff: bool | str = True,
) -> fx.GraphModule:
    """Trace ``model``, run the pass pipeline, return the quantized GraphModule.

    The result carries ``.report`` (per-pass, per-node QSNR against FP32) and
    ``.qconfig``. ``model`` itself is never modified.

    ``int_kernels`` (``backend="int"`` only): ``"auto"`` (default) is ``"onednn"`` on an x86 CPU
    where torch has oneDNN's int8 kernels and ``"portable"`` elsewhere (other CPUs, a model or
    calibration data on CUDA); ``report.notes`` says which was chosen and why. ``"portable"``
    runs every Linear as ``torch._int_mm`` with dyadic integer requantization, on any device;
    ``"onednn"`` (x86 CPUs) runs the Linears on oneDNN's int8 kernel with the scales, bias, GELU
    and the next point's quantization in the GEMM's epilogue (float32 scale arithmetic, as
    torchao's PT2E X86 path) and each attention core as one C++ kernel, the fastest choice,
    also under ``torch.compile`` with inductor freezing (``fxquant.runtime.onednn``). With a
    custom ``passes=`` list the kernels are whatever those passes make (``"auto"`` then
    chooses nothing).

    ``calib_data``: one (N, C, H, W) tensor (split into batches of 8), a list or other iterable
    of batches (tensors, (tensor, label) pairs, dicts with an ``'image'`` tensor) or a
    DataLoader. Batches must be floating-point tensors holding at least one image, all
    images of one shape, the size the model's patch embedding accepts; anything else is
    refused with the batch's index and what to do. Integer and bool tensors (e.g. uint8
    pixels) are refused rather than cast: calibrate on the model's real, preprocessed
    input (``x.float() / 255`` and the model's normalization), or every range is measured
    on values the deployed model never sees. Data in memory is checked before tracing; a
    DataLoader as the passes read it. ``diff_inputs`` are checked the same way.

    ``compile`` does not touch the global torch RNG (``torch.get_rng_state()`` is the same
    before and after): new modules are built without random initialisation and every
    random choice (default diff input, observer subsamples) uses its own seeded generator.

    ``progress``: tqdm bars for calibration and for observer range searches (OMSE, KL) long
    enough to notice (about a second or more); ``False`` shows none.

    ``numeric_diff=False`` skips the node-by-node comparison after each pass (the report then
    has timings but no QSNR): for quick compiles of large models once the pipeline is trusted.
    ``numeric_diff="final"`` compares only the last pass's graph (the report's final record has
    the per-node QSNR, the others only timings); ``True`` (or ``"all"``) after every pass. The
    compiled graph is the same in every mode; ``record.diff_seconds`` is the diff's own time.

    ``keep_float=K`` (K > 0): after the pipeline the K most sensitive quantization points are
    left in float. Sensitivity = the model output's QSNR when that point alone quantizes
    (:func:`fxquant.debug.rank_by_output`), measured on the *first calibration batch* (real
    data, several images) rather than on ``diff_inputs`` (one seeded randn image by default,
    a noisy ranking). The points are listed in ``.keep_float``, ``report.keep_float`` and,
    with their rank, in ``report.float_points``; the per-pass records describe the pipeline
    before the fallback, and ``report.notes`` gets the output QSNR (diff inputs) before/after.
    With ``backend="int"`` the points are chosen on the fake-quant graph, before
    ``lower_integer``, which then leaves them, and the integer ops that would read them, in
    float (listed in ``report.float_points`` with the reason).
    """
    if not isinstance(model, nn.Module):
        raise FxqError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise FxqError(f"backend {backend!r} is not available in this version; choose one of {BACKENDS}")
    if int_kernels not in INT_KERNELS:
        raise FxqError(f"int_kernels {int_kernels!r} is not one of {INT_KERNELS}")
    if int_kernels == "onednn" and backend != "int":
        raise FxqError(f"int_kernels={int_kernels!r} chooses the integer graph's kernels; it needs backend='int'")
    if int_kernels == "onednn" and passes is not None:
        raise FxqError(
            f"int_kernels={int_kernels!r} chooses passes of the default pipeline; with a custom passes= "
            "list add them yourself (LowerInteger(), UseOnednnKernels(), FuseResidualAdds(), FuseIntAttention())"
        )
    if int_kernels == "onednn" and not onednn_available():
        raise FxqError(
            "int_kernels='onednn' needs oneDNN's int8 Linear kernels (an x86 CPU build of torch with "
            "oneDNN); they are not available here: use int_kernels='portable'"
        )
    if numeric_diff not in NUMERIC_DIFF_MODES:
        raise FxqError(f"numeric_diff must be True, False, 'all' or 'final', got {numeric_diff!r}")
    if isinstance(keep_float, bool) or not isinstance(keep_float, int) or keep_float < 0:
        raise FxqError(f"keep_float must be an integer >= 0, got {keep_float!r}")
    if keep_float and backend == "int" and passes is not None:
        raise FxqError(
            "keep_float with backend='int' chooses the points on the fake-quant graph of the default "
            "pipeline, then lowers; it cannot be combined with a custom passes= list"
        )
    config = load_qconfig(qconfig)
    check_globs(config, (name for name, _ in model.named_modules()), model_name or type(model).__name__)
    example, calib_data = reusable_batches(calib_data)
    if diff_inputs is None:
        diff_inputs = default_diff_inputs(example)
    elif isinstance(diff_inputs, torch.Tensor):
        diff_inputs = (diff_inputs,)
    diff_inputs = tuple(diff_inputs)
    _check_inputs(model, example, diff_inputs)
    kernels_note, auto_onednn = None, False
    if backend == "int" and passes is None:
        chosen, why = resolve_int_kernels(int_kernels, _device_of(model, example))
        kernels_note = f"int_kernels={int_kernels} -> {chosen}: {why}"
        auto_onednn, int_kernels = int_kernels == "auto" and chosen == "onednn", chosen
    elif backend == "int" and int_kernels == "auto":
        kernels_note = "int_kernels=auto: a custom passes= list; the kernels are those its passes make"

    gm = trace(model, example_inputs=example)
    specialized = gm.meta.get("fxq.specialized_input")
    for index, value in enumerate(diff_inputs if specialized is not None else ()):
        if tuple(value.shape[1:]) != specialized:
            raise FxqError(
                f"diff_inputs {index} has shape {tuple(value.shape)}, but {type(model).__name__} could only be "
                f"traced for the calibration images' size (N, {', '.join(map(str, specialized))}): Python "
                "branches on tensor sizes; give diff inputs of that size"
            )
    reference = copy.deepcopy(gm) if numeric_diff else gm  # only NumericDiff reads the reference
    report = Report(model=model_name or type(model).__name__, qconfig=config.name, backend=backend)
    ctx = PassContext(
        qconfig=config,
        reference=reference,
        diff_inputs=diff_inputs,
        calib_data=calib_data,
        dump_dir=Path(dump_dir) if dump_dir else None,
        report=report,
        progress=progress,
    )
    report.passes.append(_trace_record(model, gm, diff_inputs))
    pipeline = list(passes) if passes is not None else default_passes(backend, int_kernels, config)
    instruments = [Timing()]
    if numeric_diff:
        last = pipeline[-1].name if numeric_diff == "final" and pipeline else None
        instruments.append(NumericDiff(only_after=last))
    if dump_dir:
        dumper = GraphDump(dump_dir)
        start = time.perf_counter()
        dumper.dump("trace", gm, report.passes[0])
        report.passes[0].dump_seconds = time.perf_counter() - start
        instruments.append(dumper)
    # two stages: up to the fake-quant graph (keep_float chooses its points there), then the integer
    # passes (from the one that provides Prop.INTEGER). Both orders are checked before anything runs.
    fake_stage, int_stage = stages(pipeline)
    fake_manager = PassManager(fake_stage, instruments)
    int_manager = PassManager(int_stage, instruments, holds=fake_manager.holds_after) if int_stage else None
    with observer_progress(progress):  # the OMSE/KL range searches show a bar when they take long
        gm = fake_manager.run(gm, ctx)
    gm.report = report
    if Prop.FAKE_QUANT in fake_manager.holds_after:  # weights are quantized (or not) by now
        coverage = weight_coverage(gm, report.float_points)
        report.weight_coverage = coverage.to_dict()
        report.warnings += [w for w in (coverage.warning(), no_activation_warning(gm, config)) if w]
    gm.keep_float = []
    kept_notes = []
    if keep_float:
        # fxquant.debug builds the float stand-in modules with nn.Linear/nn.Conv2d, whose random
        # init would advance the user's global RNG: keep it as it was
        with torch.random.fork_rng(devices=[]):
            kept_notes.append(_keep_float(gm, keep_float, example, diff_inputs, reference))
    equivalence_notes = []
    if int_manager is not None:
        fake = copy.deepcopy(gm)  # the equivalence measurement's yardstick
        if auto_onednn:  # the oneDNN passes need integer ops: a graph left all float stays portable
            gm, skipped = _run_auto_onednn(int_stage, instruments, fake_manager.holds_after, gm, ctx)
            kernels_note += skipped
        else:
            gm = int_manager.run(gm, ctx, after=[r.name for r in report.passes[1:]])
        release_setup_tensors(gm)  # once, at the end: every integer pass has had the IntLinears' scales
        fp32 = reference if numeric_diff else None  # without the diff, ``reference`` is the graph itself
        equivalence_notes = measure_equivalence(fake, gm, diff_inputs, fp32).notes()
        weights = weight_bytes(gm)
        report.weight_bytes = weights.to_dict()
        equivalence_notes.append(weights.note())
    report.notes = [kernels_note] if kernels_note else []
    report.notes += [note for record in report.passes for note in record.notes] + kept_notes + equivalence_notes
    gm.qconfig = config
    gm.meta["fxq.model_name"], gm.meta["fxq.qconfig_name"] = report.model, config.name  # survive a deepcopy
    return gm


def _run_auto_onednn(
    int_stage: list, instruments: list, holds: frozenset, gm: fx.GraphModule, ctx: PassContext
) -> tuple[fx.GraphModule, str]:
    """The integer stage of ``int_kernels="auto"`` on oneDNN: ``lower_integer``, then the oneDNN
    passes only if it lowered something (they refuse a graph without integer ops, which an
    explicit ``int_kernels="onednn"`` keeps as an error). Returns the graph and what to add to
    the kernels note."""
    report = ctx.report
    lowering, rest = split_before(int_stage, Prop.ONEDNN_KERNELS)
    first = PassManager(lowering, instruments, holds=holds)
    gm = first.run(gm, ctx, after=[r.name for r in report.passes[1:]])
    skipped = ""
    if not integer_ops_lowered(gm):
        onednn_props = {Prop.ONEDNN_KERNELS, Prop.ATTENTION_FUSED, Prop.RESIDUAL_FUSED}
        rest = [p for p in rest if not onednn_props & contract_of(p).provides]
        skipped = "; lower_integer left no integer op, so the oneDNN passes are skipped (portable graph)"
    if rest:
        gm = PassManager(rest, instruments, holds=first.holds_after).run(
            gm, ctx, after=[r.name for r in report.passes[1:]]
        )
    return gm, skipped


def _device_of(model: nn.Module, example: torch.Tensor) -> torch.device:
    """Where the model runs: its first parameter or buffer's device, else the calibration data's."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return example.device


NUMERIC_DIFF_MODES = (True, False, "all", "final")


def _check_inputs(model: nn.Module, example: torch.Tensor, diff_inputs: tuple) -> None:
    """Before tracing: the calibration images and diff inputs fit the model's input."""
    check_image_input(model, example, "calib_data batch 0")
    if not diff_inputs:
        raise FxqError("diff_inputs is empty; give the model's input tensor (or leave diff_inputs=None)")
    for index, value in enumerate(diff_inputs):
        if not isinstance(value, torch.Tensor):
            raise FxqError(f"diff_inputs {index} is {type(value).__name__}; expected a tensor (N, C, H, W)")
        check_batch(value, index, what="diff_inputs")
    check_image_input(model, diff_inputs[0], "diff_inputs 0")


@torch.no_grad()
def _keep_float(
    gm: fx.GraphModule, k: int, example: torch.Tensor, diff_inputs: tuple, reference: fx.GraphModule
) -> str:

    before = output_qsnr(reference(*diff_inputs), gm(*diff_inputs))
    kept = keep_most_sensitive(gm, k, (example,))
    after = output_qsnr(reference(*diff_inputs), gm(*diff_inputs))
    return (
        f"keep_float {k}: {len(kept)} point(s) left in float, ranked on the first calibration "
        f"batch ({example.shape[0]} image(s)); output QSNR on the diff inputs "
        f"{before:.2f} -> {after:.2f} dB"
    )


@torch.no_grad()
def _trace_record(model: nn.Module, gm: fx.GraphModule, diff_inputs: tuple) -> PassRecord:
    """Pass 0: the traced graph against the user's model itself (tracing must be exact)."""
    record = PassRecord("trace")
    specialized = gm.meta.get("fxq.specialized_input")
    if specialized is not None:
        record.notes.append(
            f"traced with the calibration images' sizes (Python branches on tensor sizes): the graph "
            f"accepts inputs of shape (N, {', '.join(map(str, specialized))}) only, any batch size N"
        )
    if model.training:
        record.notes.append("model is in training mode: eager comparison skipped (tracing uses eval mode)")
        return record
    shapes = [tuple(t.shape) for t in diff_inputs]
    try:
        expected = model(*diff_inputs)
    except Exception as exc:
        raise FxqError(
            f"the model rejects inputs of shape {shapes} (taken from the calibration data "
            f"or diff_inputs): {type(exc).__name__}: {exc}"
        ) from None
    record.output_qsnr_db = output_qsnr(expected, gm(*diff_inputs))
    return record
