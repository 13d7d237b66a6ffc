"""Distributed calibration: 2 gloo processes on localhost give the single-process parameters.

Min-max and OMSE points (and the smoothing and weights that depend on them) must be
bit-exact; EMA and percentile points within the documented bound (fxquant.quant.distributed): the
merged range ends lie within the spread of the per-batch statistics.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import TINY_VIT, images

import fxquant
from fxquant.quant import distributed
from fxquant.quant.observers import EmaObserver, PercentileObserver
from fxquant.quant.tail_quantiles import tail_quantiles
from fxquant.runtime.fake_quant import QUANTIZED_WEIGHT_TYPES, FakeQuantize

WORLD = 2
# w8a8 with its EMA/percentile counterparts on some points (batch-order dependent observers)
ORDERED = {
    "extends": "w8a8",
    "norm1": {"bits": 8, "signed": False, "calibration_mode": "layer_wise", "observer_type": "EmaObserver"},
    "attn_v_out": {"bits": 8, "signed": False, "calibration_mode": "layer_wise", "observer_type": "EmaObserver"},
    "norm2": {
        "bits": 8,
        "signed": False,
        "calibration_mode": "layer_wise",
        "observer_type": "PercentileObserver",
        "percentile_alpha": 0.99,
    },
    "mlp_gelu": {
        "bits": 8,
        "signed": False,
        "calibration_mode": "layer_wise",
        "observer_type": "PercentileObserver",
        "percentile_alpha": 0.99,
    },
}
QCONFIGS = {"w8a8": "w8a8", "ordered": ORDERED}
ORDER_DEPENDENT = ("ema", "percentile")


def _model_and_batches():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    return model, list(images(16, 32).split(4))  # 4 batches: 2 per rank


def _parameters(qm) -> dict[str, torch.Tensor]:
    """Every tensor of the compiled model plus each weight's quantization scale and zero point."""
    params = {k: v.detach().clone().contiguous() for k, v in qm.state_dict().items()}
    for name, module in qm.named_modules():
        if isinstance(module, QUANTIZED_WEIGHT_TYPES):
            params[f"{name}.weight_qparams.scale"] = module.weight_qparams.scale.clone()
            params[f"{name}.weight_qparams.zero_point"] = module.weight_qparams.zero_point.clone()
    return params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, batches = _model_and_batches()
        shard = distributed.shard_batches(batches)
        compiled = {}
        for key, qconfig in QCONFIGS.items():
            compiled[key] = qm = fxquant.compile(model, qconfig, calib_data=shard, progress=False, numeric_diff=False)
            save_file(_parameters(qm), os.path.join(out_dir, f"{key}_rank{rank}.safetensors"))
        # distributed evaluation: each rank runs its images, the outputs are gathered in order
        x = images(7, 32, seed=9)
        mine = distributed.shard_range(len(x))
        with torch.no_grad():
            outputs = distributed.gather_outputs(compiled["w8a8"](x[mine.start : mine.stop]))
        counts = distributed.reduce_sums({"images": len(mine), "ranks": 1})
        save_file(
            {"outputs": outputs, "counts": torch.tensor([counts["images"], counts["ranks"]])},
            os.path.join(out_dir, f"eval_rank{rank}.safetensors"),
        )
        _cli_compile(rank, os.path.join(out_dir, "cli"))
    finally:
        dist.destroy_process_group()


def _cli_compile(rank: int, out_dir: str) -> None:
    """``fxquant compile --save --report`` inside the torchrun-like group: rank 0 alone writes."""
    import timm

    from fxquant.cli.app import main

    timm.create_model = _tiny_create_model(timm.create_model)
    rc = main(CLI_ARGS + ["--save", os.path.join(out_dir, "m.fxq"), "--report", os.path.join(out_dir, "r.json")])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rc{rank}"), "w") as fh:
        fh.write(f"{rc} {distributed.world_size()}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-process job once; its files, by name."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    files = {p.stem: load_file(str(p)) for p in out.glob("*.safetensors")}
    files["dir"] = out
    return files


def _single_process(qconfig, monkeypatch):
    """Compile on all batches in one process, recording the per-batch statistics of EMA and
    percentile observers (the bound of their merge)."""
    per_batch: dict[str, list] = {}

    def recording(cls, stat):
        original = cls._observe

        def observe(self, x, lo, hi):
            per_batch.setdefault(self.name, []).append(stat(self, x, lo, hi))
            return original(self, x, lo, hi)

        monkeypatch.setattr(cls, "_observe", observe)

    recording(EmaObserver, lambda self, x, lo, hi: (lo, hi))
    recording(PercentileObserver, lambda self, x, lo, hi: tail_quantiles(self._grouping.matrix(x), self.alpha))
    model, batches = _model_and_batches()
    qm = fxquant.compile(model, qconfig, calib_data=batches, progress=False, numeric_diff=False)
    return qm, per_batch


def _order_dependent_points(qm) -> dict[str, tuple[str, FakeQuantize]]:
    """state_dict prefix -> (observer name, FakeQuantize) for EMA/percentile points."""
    out = {}
    for node in qm.graph.nodes:
        if node.op == "call_module":
            module = qm.get_submodule(str(node.target))
            if isinstance(module, FakeQuantize) and module.point.spec.observer in ORDER_DEPENDENT:
                out[str(node.target)] = (f"{node.args[0].name} ({module.point.label})", module)  # the observed op
    return out


@pytest.mark.parametrize("key", sorted(QCONFIGS))
def test_two_gloo_ranks_give_the_single_process_parameters(ranks, key, monkeypatch):
    single, per_batch = _single_process(QCONFIGS[key], monkeypatch)
    expected = _parameters(single)
    rank0, rank1 = ranks[f"{key}_rank0"], ranks[f"{key}_rank1"]
    assert rank0.keys() == rank1.keys() == expected.keys()
    for name in expected:  # every rank holds the same model
        assert torch.equal(rank0[name], rank1[name]), name
    ordered = _order_dependent_points(single)
    assert bool(ordered) == (key == "ordered")
    exact = [n for n in expected if n.rsplit(".", 1)[0] not in ordered]
    for name in exact:  # min-max and OMSE points, smoothing, weights: bit-exact
        assert torch.equal(rank0[name], expected[name]), name
    for target, (observer_name, fq) in ordered.items():
        stats = per_batch[observer_name]
        assert len(stats) == 4
        lows = torch.stack([lo.clamp(max=0) for lo, _ in stats])
        highs = torch.stack([hi.clamp(min=0) for _, hi in stats])
        spread = (lows.max(0).values - lows.min(0).values) + (highs.max(0).values - highs.min(0).values)
        qp = fq.qparams
        bound = float(spread.max()) / (qp.qmax - qp.qmin)
        got, want = rank0[f"{target}.scale"], expected[f"{target}.scale"]
        assert abs(float(got - want)) <= bound * (1 + 1e-6) + 1e-9, (target, float(got), float(want), bound)


def test_distributed_evaluation_gathers_outputs_in_order(ranks, monkeypatch):
    qm, _ = _single_process("w8a8", monkeypatch)  # bit-exact with the ranks' w8a8 model (above)
    x = images(7, 32, seed=9)
    with torch.no_grad():  # rank 0 ran images 0-2, rank 1 images 3-6
        expected = torch.cat([qm(x[:3]), qm(x[3:])])
    for r in range(WORLD):
        gathered = ranks[f"eval_rank{r}"]
        assert gathered["counts"].tolist() == [7, WORLD]
        assert torch.equal(gathered["outputs"], expected)


def test_shard_helpers_without_a_process_group():
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert [list(distributed.shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    batches = list(torch.arange(5).reshape(5, 1, 1, 1).float())
    shards = [distributed.shard_batches(batches, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 3] and shards[0] + shards[1] == batches
    with pytest.raises(fxquant.FxqError, match="every rank needs at least"):
        distributed.shard_batches(batches[:1], 0, 2)
    x = torch.ones(3)
    assert distributed.gather_outputs(x) is x and distributed.all_reduce_max(x) is x
    assert distributed.reduce_sums({"a": 2}) == {"a": 2.0}


def test_every_observer_type_has_a_merge():
    from fxquant.quant.observers import MinMaxObserver, OmseObserver, observer_class, registered_observers

    assert len(registered_observers()) >= 6
    for name in registered_observers():  # KLObserver and PtfObserver inherit OMSE's merge
        assert distributed.merge_for(observer_class(name)) is not None, name
    assert distributed.merge_for(OmseObserver) is not distributed.merge_for(MinMaxObserver)


def test_register_merge_refuses_a_second_merge_and_a_non_observer():
    from fxquant.quant.observers import MinMaxObserver

    with pytest.raises(ValueError, match="merge for MinMaxObserver is already registered"):
        distributed.register_merge(MinMaxObserver)(lambda observer, counts, metas: None)
    with pytest.raises(TypeError, match="not a subclass of fxquant.quant.observers.Observer"):
        distributed.register_merge(dict)
    assert distributed.merge_for(MinMaxObserver).__name__ == "_merge_minmax"  # the first one stays


def _tiny_create_model(real):
    def create_model(name, *args, **kwargs):  # the CLI's vit_tiny, shrunk as in tests/test_cli.py
        return real(name, *args, **{**dict(patch_size=8, depth=2, embed_dim=64, num_heads=2), **kwargs})

    return create_model


CLI_ARGS = [
    "compile",
    "--model",
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--num-classes",
    "10",
    "--calib",
    "random:8",
    "--batch-size",
    "2",
    "--quiet",
    "--no-diff",
]


def test_cli_compile_under_torchrun_saves_the_single_process_model_once(ranks, tmp_path, monkeypatch):
    import timm

    from fxquant.cli.app import main

    cli_dir = ranks["dir"] / "cli"
    assert [(cli_dir / f"rc{r}").read_text() for r in range(WORLD)] == [f"0 {WORLD}"] * WORLD
    assert sorted(p.name for p in cli_dir.iterdir()) == ["m.fxq", "r.json", "rc0", "rc1"]  # written once
    monkeypatch.setattr(timm, "create_model", _tiny_create_model(timm.create_model))
    single = tmp_path / "single"
    assert main(CLI_ARGS + ["--save", str(single / "m.fxq")]) == 0
    expected, got = fxquant.load(single / "m.fxq"), fxquant.load(cli_dir / "m.fxq")
    assert _parameters(got).keys() == _parameters(expected).keys()
    for name, value in _parameters(expected).items():
        assert torch.equal(_parameters(got)[name], value), name
