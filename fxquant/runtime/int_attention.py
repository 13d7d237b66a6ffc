"""The integer graph's attention core as one CPU kernel (``int_kernels="onednn"``).

After ``lower_integer`` and ``use_onednn_kernels``, a ViT's attention is four ops:

    scores codes = IntMatmul(q codes, kT codes)        exact int32, float32 requantization
    x            = DequantizeCodes(scores codes)        one multiply-add
    probs        = softmax(x, -1)                       float
    out          = probs @ DequantizeCodes(v codes)     float matmul

Between them the (B, H, N, N) scores go to memory three times. ``IntAttention`` computes
the same four steps per (batch, head) in one C++ kernel (``fxquant/runtime/csrc/int_attention.cpp``,
built on first use with torch's extension builder and cached; a (batch, head) is split into
blocks of query rows when there are few for the threads): q @ kT on the int8 GEMM, the
scores kept in the cache, and no exp per element (the scores are codes, so
``exp(x_j - x_max)`` is one of ``qmax - qmin + 1`` values per head, 256 for 8-bit scores,
read from a table). On ViT-B/16 batch 8
with 2 threads one layer's attention takes about 5 ms, against 8.5 ms for torch's flash
attention in float and about 10 ms for the four ops under torch.compile.

The result equals the four ops up to float32 rounding of the softmax and of attn@V (the
codes of the scores are computed with the same arithmetic, exactly); the point after it
(``attn_v_out``) can differ by one code where a value sits within that rounding of a step
boundary. Against the fake-quant graph the score codes have the integer graph's rare 1-LSB
flips, as unfused; they stay inside the kernel, so such a flip shows at ``attn_v_out``,
where it can move a code by more than one step (one score step changes that key's
probability by a factor exp(step)). ``fuse_int_attention`` measures it against the
fake-quant graph.

Without the kernel (no C++ compiler, not a CPU tensor), ``IntAttention`` runs the four ops
in torch, and ``fuse_int_attention`` leaves the graph unfused and says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fxquant.runtime.savable import Schema, TensorRule, savable

__all__ = [
    "IntAttention",
    "load_kernel",
    "kernel_ready",
    "kernel_error",
    "needs_build",
    "check_head_constants",
    "CONSTANTS",
]

_CSRC = Path(__file__).with_name("csrc")
# one extension, fxquant_kernels: the fused attention, Log-Int-Softmax + attn@V
# (log_int_softmax.LisShiftMatmul), integer LayerNorm and code lookup tables
# (int_layernorm.IntLayerNorm, int_layernorm.CodeLut)
_SOURCES = [_CSRC / "int_attention.cpp", _CSRC / "lis_matmul.cpp", _CSRC / "int_rows.cpp"]
# IEEE-preserving flags only: -fno-math-errno and -fno-trapping-math let rint and the
# selects vectorize without changing a result; no -ffast-math (the float sums would reorder);
# -ffp-contract=off: no fused multiply-add where the torch reference rounds the product
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU builds: without it the kernel runs on one thread

# per-head constants of the kernel, in this order (columns of IntAttention.head_constants)
CONSTANTS = (
    "q_zero_point",
    "k_zero_point",
    "score_multiplier",
    "score_zero_point",
    "score_scale",
    "score_bias",
    "v_scale",
    "v_zero_point",
)


class _Kernel:
    """The kernel's state in this process. A failed build is remembered with its cause, the
    attempt count, when it failed and the build environment it failed in; ``load_kernel``
    tries again when asked (``retry=True``), when that environment changed (a compiler or
    ninja installed, PATH/CC/CXX set) or after a back-off (``retry_delay``: a transient
    failure, such as a lock held by another process's build, does not disable fusion until
    a restart). A failure that no retry can fix (not an x86-64 CPU) is ``permanent``."""

    lock = threading.Lock()
    tried = False  # an attempt was made (and, unless ready, failed)
    ready = False
    error: Optional[str] = None
    attempts = 0  # failed attempts so far
    failed_at: Optional[float] = None  # time.monotonic() of the last failure
    failed_env: Optional[tuple] = None  # build_environment() at the last failure
    permanent = False


RETRY_DELAY_S = 60.0  # first back-off after a failed build; doubles per failure, up to RETRY_DELAY_MAX_S
RETRY_DELAY_MAX_S = 3600.0


def build_environment() -> tuple:
    """What a build depends on outside fxquant: the compilers and ninja found, and the
    variables that choose them. A failure is retried once this changes."""
    return (
        os.environ.get("PATH", ""),
        os.environ.get("CXX", ""),
        os.environ.get("CC", ""),
        shutil.which(os.environ.get("CXX") or "c++"),
        shutil.which("ninja"),
    )


def retry_delay(attempts: int) -> float:
    """Seconds after the ``attempts``-th failure before ``load_kernel`` builds again unasked."""
    return min(RETRY_DELAY_MAX_S, RETRY_DELAY_S * 2.0 ** max(attempts - 1, 0))


def _retry_due() -> bool:
    if _Kernel.permanent:
        return False
    if _Kernel.failed_env is not None and _Kernel.failed_env != build_environment():
        return True
    return _Kernel.failed_at is not None and time.monotonic() - _Kernel.failed_at >= retry_delay(_Kernel.attempts)


def _cpu_tag() -> str:
    """What the build is specialised for (-march=native): the CPU's feature flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _extension_name() -> str:
    return f"fxquant_kernels_{_cpu_tag()}"


def needs_build() -> bool:
    """True when ``load_kernel`` would have to compile (no built library in torch's extension
    cache yet): callers use it to tell the user why the next step takes 10-30 s."""
    if _Kernel.ready or (_Kernel.tried and not _retry_due()) or _registered():
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory

        name = _extension_name()
        return not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it moves, just say nothing
        return False


def load_kernel(retry: bool = False) -> bool:
    """Build (first call on a machine, about 10-30 s) or load the kernel; True when
    ``torch.ops.fxquant_kernels.int_attention`` is ready. A failure is remembered
    (``kernel_error()``: the cause and the attempt count), ``IntAttention`` then runs its
    torch fallback, and later calls return False at once until ``retry=True``, a changed
    build environment or the back-off (see ``_Kernel``) allows another build."""
    with _Kernel.lock:
        if _Kernel.ready:
            return True
        if _Kernel.tried and not (retry and not _Kernel.permanent) and not _retry_due():
            return False
        _Kernel.tried = True
        if _registered():  # built and loaded earlier in this process
            _Kernel.ready, _Kernel.error = True, None
            return True
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _Kernel.error = f"the fused attention kernel is built for x86-64 CPUs, this is {platform.machine()}"
            _Kernel.permanent = True
            return False
        environment = build_environment()
        try:
            _build()
        except Exception as exc:  # no compiler, no ninja, a build error, a lock: the fallback still works
            _Kernel.attempts += 1
            _Kernel.failed_at, _Kernel.failed_env = time.monotonic(), environment
            _Kernel.error = (
                f"building fxquant/runtime/csrc/ (the fxquant_kernels extension) failed "
                f"(attempt {_Kernel.attempts}; retried "
                f"when the compiler setup changes, after {retry_delay(_Kernel.attempts):.0f} s, or by "
                f"load_kernel(retry=True)): {type(exc).__name__}: {_cause(exc)}"
            )
            return False
        _Kernel.ready, _Kernel.error = True, None
        return True


def _build() -> None:
    """Compile (or load from torch's extension cache) and register the kernel; raises on failure."""
    from torch.utils.cpp_extension import load

    load(
        name=_extension_name(),
        sources=[str(source) for source in _SOURCES],
        extra_cflags=_CFLAGS + ["-march=native"],
        extra_ldflags=_LDFLAGS,
        is_python_module=False,
        verbose=False,
    )
    torch.library.register_fake("fxquant_kernels::int_attention")(_int_attention_shape)
    for name, shape in _FAKES.items():
        torch.library.register_fake(f"fxquant_kernels::{name}")(shape)


# shape functions of the other ops in the extension (torch.compile traces them with these)
_FAKES = {
    "lis_shift_matmul": lambda scores, v, grid, table, v_scale, v_zero, bits, max_shift, renormalize: scores.new_empty(
        (*scores.shape[:3], v.shape[3])
    ),
    "ptf_layernorm": lambda codes, alpha, zp, eps, sb, wu, off, ozp, qmin, qmax, out_uint8: codes.new_empty(
        codes.shape, dtype=torch.uint8 if out_uint8 else torch.int8
    ),
    "code_lut": lambda codes, table, out_uint8: codes.new_empty(
        codes.shape, dtype=torch.uint8 if out_uint8 else torch.int8
    ),
    "quantize_rows": lambda x, scale, zero, qmin, qmax, out_uint8: x.new_empty(
        x.shape, dtype=torch.uint8 if out_uint8 else torch.int8
    ),
    "dequantize_rows": lambda codes, scale, zero, post_scale: codes.new_empty(codes.shape, dtype=torch.float32),
    "dequantize_add": lambda x, codes, scale, zero, post_scale: x.new_empty(x.shape),
    "int_attention_lis": lambda q, kt, v, consts, qmin, qmax, table, vs, vz, bits, shift, renorm: q.new_empty(
        (q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=torch.float32
    ),
}


def _registered() -> bool:
    """Every op of the extension is registered (a library from older sources, loaded earlier in
    this process, lacks the newer ones: not ready)."""
    try:
        return all(hasattr(torch.ops.fxquant_kernels, name) for name in ("int_attention", *_FAKES))
    except RuntimeError:
        return False


def _cause(exc: Exception) -> str:
    """The useful part of a build failure: the compiler's error lines, else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("[")]
    picked = errors[:2] if errors else lines[-1:]
    return " | ".join(picked)[:600]


def kernel_ready() -> bool:
    """True once ``load_kernel`` succeeded (a plain read: safe inside torch.compile)."""
    return _Kernel.ready


def kernel_error() -> Optional[str]:
    """Why the kernel is not available, after a failed ``load_kernel``; None otherwise."""
    return _Kernel.error


def _int_attention_shape(
    q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, consts: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]), dtype=torch.float32)


def per_head(value: torch.Tensor, heads: Optional[int], what: str) -> torch.Tensor:
    """A constant that broadcasts against a (B, H, rows, cols) tensor as one value per head
    (or one for all), flattened to (H,) or (1,); ValueError for any other layout."""
    shape = tuple(value.shape)
    padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else shape
    if len(padded) != 4 or any(size != 1 for i, size in enumerate(padded) if i != 1):
        raise ValueError(f"{what} has shape {shape}: not one value per head")
    if heads is not None and padded[1] not in (1, heads):
        raise ValueError(f"{what} has {padded[1]} values, the attention has {heads} heads")
    return value.detach().reshape(-1).to(torch.float32)


def check_head_constants(head_constants: torch.Tensor) -> None:
    """ValueError unless ``head_constants`` is what ``IntAttention`` takes: (H or 1, 8), with a
    score scale that is not negative (the kernel's softmax takes the largest code as the
    largest score)."""
    if head_constants.dim() != 2 or head_constants.shape[1] != len(CONSTANTS):
        raise ValueError(f"head_constants must be (heads, {len(CONSTANTS)}), got {tuple(head_constants.shape)}")
    if not bool((head_constants[:, CONSTANTS.index("score_scale")] >= 0).all()):
        raise ValueError(
            "the scores' dequantization scale must not be negative (the kernel's softmax takes the "
            "largest code as the largest score)"
        )


@savable(
    Schema(
        {"label": str, "qmin": int, "qmax": int},
        {"head_constants": TensorRule((torch.float32,), ndims=(2,), required=True)},
    )
)
class IntAttention(nn.Module):
    """``softmax(dequantize(requantize(q @ kT))) @ dequantize(v)`` on codes, one kernel.

    ``head_constants`` (H or 1, 8) float32 holds, per head, the columns ``CONSTANTS``: the
    zero points of q and k codes, the float32 multiplier and zero point that requantize the
    exact accumulator to the score codes (``IntMatmul.use_float_requantization``), the
    multiply-add that dequantizes them (``DequantizeCodes.fuse_affine``), and V's scale and
    zero point. Zero points are in the domain of the codes they apply to (uint8 codes: the
    int8 zero point + 128). Inputs: q (B, H, N, D), kT (B, H, D, M), v (B, H, M, Dv), each
    int8 or uint8 codes; output float32 (B, H, N, Dv).
    """

    def __init__(self, head_constants: torch.Tensor, qmin: int, qmax: int, label: str = ""):
        super().__init__()
        check_head_constants(head_constants)
        self.qmin, self.qmax, self.label = int(qmin), int(qmax), label
        self.register_buffer("head_constants", head_constants.to(torch.float32).contiguous().clone())
        load_kernel()  # here, not in forward: a first call under torch.compile must already see it

    def __setstate__(self, state: dict) -> None:
        """Unpickled (torch.load of a whole graph, a worker process): load the kernel now, as
        ``__init__`` does (``fxquant.load`` builds modules without either and loads it itself)."""
        super().__setstate__(state)
        load_kernel()

    def _constants(self, heads: int) -> torch.Tensor:
        c = self.head_constants
        return c.expand(heads, c.shape[1]).contiguous() if c.shape[0] == 1 and heads != 1 else c

    def forward(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kernel_ready() and q.device.type == "cpu" and q.dim() == 4 and kt.dim() == 4 and v.dim() == 4:
            batch, heads = q.shape[:2]  # K or V shared across batch or heads: stride-0 views, no copy
            out = torch.ops.fxquant_kernels.int_attention(
                q,
                kt.expand(batch, heads, -1, -1),
                v.expand(batch, heads, -1, -1),
                self._constants(heads),
                self.qmin,
                self.qmax,
            )
            return out.transpose(1, 2)
        return self.reference(q, kt, v)

    def reference(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The four unfused ops in torch (float32 on integer values: exact products)."""
        c = self.head_constants.t().reshape(len(CONSTANTS), -1, 1, 1)  # each (H or 1, 1, 1)
        zq, zk, multiplier, zs, scale, bias, sv, zv = c.unbind(0)
        acc = torch.matmul(q.to(torch.float32) - zq, kt.to(torch.float32) - zk)
        codes = torch.round(acc * multiplier).add_(zs).clamp_(self.qmin, self.qmax)
        probs = torch.addcmul(bias, codes, scale).softmax(-1)
        return torch.matmul(probs, (v.to(torch.float32) - zv) * sv)

    def extra_repr(self) -> str:
        return (
            f"{self.label}: q @ kT (int8 GEMM) -> score codes [{self.qmin}, {self.qmax}] -> softmax -> @ v, "
            f"one fused kernel"
        )
