"""Packed 4-bit weights (issue 18): weight bytes and the per-call unpack cost.

    python -m bench.packed_weights [--model deit_small_patch16_224] [--kernels portable onednn]

For each kernel choice: ``fxquant.compile(model, "w4a8", backend="int", int_kernels=...)`` on
the timm model with random init (seeded), 8 seeded randn calibration images, no numeric diff.
Then:

* weight bytes (``fxquant.analysis.weight_bytes``): the integer Linears' packed codes against
  the FP32 bytes of every Linear/Conv weight; and with the layers the graph holds in float;
* equality: the packed graph's output on a batch of 8 seeded images against the same graph
  with every weight unpacked back to int8 (must be bit-identical);
* per-call cost: median eager forward time (batch 8, one torch thread) of the packed graph
  and of the unpacked copy, interleaved; and the time of the unpacking alone
  (``int8_weight()`` of every packed Linear) and, for oneDNN Linears, of oneDNN's prepack of
  the unpacked weights (what an ``OnednnLinear`` with a packed weight adds to each call).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import fxquant
from fxquant.analysis.weight_bytes import weight_bytes
from fxquant.runtime.int4_weights import PackedWeight, unpack_weights
from fxquant.runtime.onednn import OnednnLinear


def unpacked_copy(gm: torch.nn.Module) -> torch.nn.Module:
    """``gm`` with every packed weight stored as int8 codes again."""
    out = copy.deepcopy(gm)
    unpack_weights(out)
    return out


def unpack_all(gm: torch.nn.Module) -> list:
    return [m.int8_weight() for m in gm.modules() if isinstance(m, PackedWeight) and m.packed]


def prepack_all(weights: list) -> None:
    for weight in weights:
        torch.ops.onednn.qlinear_prepack(weight, None)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def measure(model_name: str, kernels: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(1)
    calib = torch.randn(8, 3, 224, 224, generator=generator)
    x = torch.randn(8, 3, 224, 224, generator=generator)
    start = time.perf_counter()
    qm = fxquant.compile(
        model, "w4a8", calib_data=calib, backend="int", int_kernels=kernels, progress=False, numeric_diff=False
    )
    compile_s = time.perf_counter() - start
    plain = unpacked_copy(qm)
    same = torch.equal(qm(x), plain(x))
    packed_ms, plain_ms = [], []
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        packed_ms.append(median_ms(lambda: qm(x), 1))
        plain_ms.append(median_ms(lambda: plain(x), 1))
    unpack_ms = median_ms(lambda: unpack_all(qm), repeats)
    onednn = any(isinstance(m, OnednnLinear) for m in qm.modules())
    weights = unpack_all(qm)
    prepack_ms = median_ms(lambda: prepack_all(weights), repeats) if onednn else 0.0
    bytes_ = weight_bytes(qm)
    return {
        "kernels": kernels,
        "compile_s": compile_s,
        "weights": bytes_,
        "same": same,
        "packed_ms": statistics.median(packed_ms),
        "plain_ms": statistics.median(plain_ms),
        "unpack_ms": unpack_ms,
        "prepack_ms": prepack_ms,
        "notes": [n for n in qm.report.notes if n.startswith(("int_kernels", "pack_int4_weights"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--kernels", nargs="+", default=["portable", "onednn"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model}, w4a8, backend int, batch 8, {args.threads} thread(s), torch {torch.__version__}")
    print(
        "| kernels | integer weight bytes (% of FP32) | with float-held layers | outputs equal to unpacked "
        "| forward packed ms | forward unpacked ms | unpack alone ms | oneDNN prepack alone ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kernels in args.kernels:
        r = measure(args.model, kernels, args.repeats)
        w = r["weights"]
        print(
            f"| {kernels} | {w.integer / 2**20:.2f} MiB of {w.fp32 / 2**20:.2f} MiB ({100 * w.integer_share:.2f}%) "
            f"| {w.total / 2**20:.2f} MiB ({100 * w.total_share:.2f}%) | {r['same']} | {r['packed_ms']:.1f} "
            f"| {r['plain_ms']:.1f} | {r['unpack_ms']:.1f} | {r['prepack_ms']:.1f} |",
            flush=True,
        )
        for note in r["notes"]:
            print(f"  {note}")
        print(
            f"  compile {r['compile_s']:.1f} s; {w.packed_layers} packed, {w.int8_layers} int8, {w.float_layers} float"
        )


if __name__ == "__main__":
    main()
