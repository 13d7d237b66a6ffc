"""What each pass needs from the graph and what it leaves: typed graph properties and the
static ``Contract`` every pass class declares, checked over a whole pipeline before it runs.

A ``Contract`` is the static counterpart of a pass's runtime probes (``Pass.requires`` /
``Pass.ensures`` look at the actual graph): ``requires`` must hold when the pass starts,
``excludes`` must not hold yet (a pass that only makes sense before another one),
``provides`` holds after it, ``removes`` no longer holds after it. ``check_order`` walks a
pipeline from the properties that hold at its start (a freshly traced graph: none) and
refuses an order that cannot work, naming the pass, the property and the pass that would
provide it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional, Sequence

from fxquant.errors import PassError


class Prop(str, Enum):
    """A property of the graph that passes provide and rely on."""

    ATTENTION_EXPLICIT = "attention_explicit"  # no fused SDPA call left: scores and probabilities are nodes
    LINEARS_AS_MODULES = "linears_as_modules"  # F.linear on a module's own weight is a call of an nn.Linear
    ANNOTATED = "annotated"  # ops carry their quantization points (fxq.point / fxq.weight meta)
    QKV_SPLIT = "qkv_split"  # fused qkv Linears are three Linears with their own points
    ROTATED = "rotated"  # residual stream and attention heads rotated by orthogonal matrices folded into weights
    REPARAMETERIZED = "reparameterized"  # post-LayerNorm per-channel grids folded into LayerNorm and Linears
    SMOOTHED = "smoothed"  # SmoothQuant factors folded into norms and weights (smooth_alpha)
    OBSERVED = "observed"  # an observer after every activation point
    CALIBRATED = "calibrated"  # the observers saw the calibration data
    SCALES_FUSED = "scales_fused"  # scale-transparent chains share one point; 1/sqrt(d) folded
    FAKE_QUANT = "fake_quant"  # frozen fake-quant points and quantized weights, no observers
    LIS_LOWERED = "lis_lowered"  # softmax + log2 point as one Log-Int-Softmax where possible
    GPTQ_ROUNDED = "gptq_rounded"  # quantized weights re-rounded by GPTQ on the quantized graph's inputs
    BIAS_CORRECTED = "bias_corrected"  # quantized layers' biases carry the mean their weight rounding removed
    INTEGER = "integer"  # int8 codes, integer GEMMs and requantization
    ONEDNN_KERNELS = "onednn_kernels"  # Linears on oneDNN's int8 kernel, float32 requantization
    ATTENTION_FUSED = "attention_fused"  # attention cores as one IntAttention kernel each
    RESIDUAL_FUSED = "residual_fused"  # residual adds in the epilogue of the oneDNN Linear before them
    WEIGHTS_PACKED = "weights_packed"  # 4-bit integer weights stored two codes per byte

    def __str__(self) -> str:
        return self.value


def _props(values: Iterable) -> frozenset:
    return frozenset(Prop(v) for v in values)  # a plain string names a property too: "calibrated"


@dataclass(frozen=True, init=False)
class Contract:
    requires: frozenset
    provides: frozenset
    removes: frozenset
    excludes: frozenset

    def __init__(
        self, requires: Iterable = (), provides: Iterable = (), removes: Iterable = (), excludes: Iterable = ()
    ):
        object.__setattr__(self, "requires", _props(requires))
        object.__setattr__(self, "provides", _props(provides))
        object.__setattr__(self, "removes", _props(removes))
        object.__setattr__(self, "excludes", _props(excludes))

    def after(self, holds: frozenset) -> frozenset:
        """The properties that hold after the pass, given those that held before it."""
        return (holds - self.removes) | self.provides


NO_CONTRACT = Contract()  # a custom pass that declares none: it needs and promises nothing


class PipelineOrderError(PassError):
    """A pipeline whose order cannot work, found before any pass runs."""

    def __init__(self, message: str, *, pass_name: str, prop: Prop, before: tuple = ()):
        super().__init__(message, pass_name=pass_name, before=before)
        self.prop = prop


def contract_of(p) -> Contract:
    contract = getattr(p, "contract", None)
    if contract is None:
        return NO_CONTRACT
    if not isinstance(contract, Contract):
        raise TypeError(f"pass '{p.name}': contract must be a fxquant.infra.contracts.Contract, got {contract!r}")
    return contract


def check_order(passes: Sequence, holds: Iterable = ()) -> frozenset:
    """Walk ``passes`` from the properties ``holds`` (what is true of the graph before the
    first pass); return the properties that hold after the last one, or raise
    ``PipelineOrderError`` at the first pass whose contract cannot be met."""
    current = _props(holds)
    removed_by: dict[Prop, str] = {}
    provided_by: dict[Prop, str] = {}
    for index, p in enumerate(passes):
        contract = contract_of(p)
        done = tuple(q.name for q in passes[:index])
        missing = sorted(contract.requires - current)
        if missing:
            prop = missing[0]
            raise PipelineOrderError(
                _missing(p.name, prop, passes[index + 1 :], removed_by.get(prop)),
                pass_name=p.name,
                prop=prop,
                before=done,
            )
        too_late = sorted(contract.excludes & current)
        if too_late:
            prop = too_late[0]
            who = provided_by.get(prop)
            source = f"'{who}' provides it earlier in this pipeline" if who else "it held when the pipeline started"
            raise PipelineOrderError(
                f"pass '{p.name}' must run before the graph is '{prop}', but {source}",
                pass_name=p.name,
                prop=prop,
                before=done,
            )
        current = contract.after(current)
        for prop in contract.removes:
            removed_by[prop] = p.name
        for prop in contract.provides:
            provided_by[prop] = p.name
            removed_by.pop(prop, None)
    return current


def _missing(name: str, prop: Prop, later: Sequence, removed_by: Optional[str]) -> str:
    head = f"pass '{name}' requires '{prop}'"
    if removed_by is not None:
        return f"{head}, which '{removed_by}' removes earlier in this pipeline: run '{name}' before '{removed_by}'"
    for q in later:
        if prop in contract_of(q).provides:
            return f"{head}, which '{q.name}' provides, but '{q.name}' comes after it in this pipeline"
    providers = known_providers(prop)
    if providers:
        return f"{head}, which {_names(providers)} provides, but {_names(providers)} is not in this pipeline"
    return f"{head}, and no pass of this pipeline provides it"


def _names(names: list[str]) -> str:
    return " or ".join(f"'{n}'" for n in names)


_PASS_CLASSES: list[type] = []  # every Pass subclass defined so far (Pass.__init_subclass__ adds them)


def register_pass_class(cls: type) -> None:
    _PASS_CLASSES.append(cls)


def known_providers(prop: Prop) -> list[str]:
    """Names of the pass classes defined so far that provide ``prop`` (fxquant's own when any do)."""
    ours, others = [], []
    for cls in _PASS_CLASSES:
        contract = cls.__dict__.get("contract")
        name = cls.__dict__.get("name")
        if isinstance(contract, Contract) and prop in contract.provides and isinstance(name, str):
            (ours if cls.__module__.startswith("fxquant.passes") else others).append(name)
    return sorted(set(ours or others))
