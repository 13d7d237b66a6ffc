"""Seeded mutations of a saved model's document and tensors (every digest recomputed): each
load gives a model whose output equals the original's, or raises SerializeError; nothing else
is raised, no canary file appears, and no process-wide torch state changes."""

import copy
import json
import random

import pytest
import torch
from serialize_craft import craft, process_state, read

import fxquant
from fxquant.io.serialize import SerializeError, load, save

timm = pytest.importorskip("timm")

MUTATIONS_PER_FILE = 150
CANARY = "fxq_fuzz_canary"
HOSTILE_STRINGS = [
    f"__import__('os').system('touch {CANARY}')",
    f"x = open('{CANARY}', 'w'), y",
    "a b (",
    "lambda",
    "def",
    "__class__",
    "_private",
    "os.system",
    "self.__dict__",
    "",
    "1abc",
    "x" * 300,
    "é",
    "a.b",
    "getattr",
    "exec",
]
HOSTILE_TARGETS = [
    "os:system",
    "builtins:eval",
    "builtins:exec",
    "builtins:open",
    "torch:load",
    "torch:save",
    "torch:set_default_dtype",
    "torch:set_num_threads",
    "torch:manual_seed",
    "torch:from_file",
    "torch:zeros",
    "torch:empty",
    "torch:set_printoptions",
    "subprocess:run",
    "math:pow",
    "torch:",
    42,
    None,
    ["torch", "cat"],
]
HOSTILE_METHODS = [
    "numpy",
    "tofile",
    "untyped_storage",
    "copy_",
    "add_",
    "set_",
    "resize_",
    "storage",
    "data_ptr",
    "share_memory_",
    "__reduce__",
    "tolist",
    "item",
    "new_zeros",
    "repeat",
    "cuda",
]
JUNK = [
    None,
    True,
    -1,
    0,
    2**31,
    10**12,
    -(10**9),
    1.5,
    float("inf"),
    "x",
    [],
    {},
    [1, 2, 3],
    {"$": "node", "v": "zz"},
    {"$": "dtype", "v": "float16"},
    {"$": "device", "v": "cuda:0"},
    {"$": "bogus"},
    [[[[[]]]]],
]


@pytest.fixture(scope="module", params=["fake", "int"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, "w8a8", calib_data=x, progress=False, backend=request.param, numeric_diff=False)
    path = save(qm, tmp_path_factory.mktemp("fuzz") / "vit.fxq")
    with torch.no_grad():
        return path, qm(x), x


def _node_mutation(rng, doc):
    node = rng.choice(doc["nodes"])
    kind = rng.choice(["target", "method", "kwarg", "name", "args", "op", "meta"])
    if kind == "target":
        node["target"] = rng.choice(HOSTILE_TARGETS)
    elif kind == "method":
        methods = [n for n in doc["nodes"] if n["op"] == "call_method"]
        (rng.choice(methods) if methods else node)["target"] = rng.choice(HOSTILE_METHODS)
    elif kind == "kwarg":
        node["kwargs"] = {"$": "dict", "v": [[rng.choice(HOSTILE_STRINGS), rng.choice(JUNK)]]}
    elif kind == "name":
        node["name"] = rng.choice(HOSTILE_STRINGS)
    elif kind == "args":
        value = rng.choice(JUNK)
        for _ in range(rng.choice([0, 5, 60, 500])):
            value = [value]
        node["args"] = {"$": "tuple", "v": [value, rng.choice(JUNK)]}
    elif kind == "op":
        node["op"] = rng.choice(["call_function", "call_module", "call_method", "get_attr", "placeholder", "eval"])
    else:
        node["meta"] = {rng.choice(["fxq.x", "type", "stack_trace", "__class__"]): rng.choice(JUNK)}


def _module_mutation(rng, doc):
    target = rng.choice(sorted(doc["modules"]))
    desc = doc["modules"][target]
    kind = rng.choice(["type", "config", "config_key", "tensor_kind", "training"])
    if kind == "type":
        desc["type"] = rng.choice(
            [
                "subprocess.Popen",
                "torch.nn.Module",
                "fxquant.ObserverModule",
                *sorted({d["type"] for d in doc["modules"].values()}),
            ]
        )
    elif kind in ("config", "config_key"):
        config = desc["config"].get("attrs", desc["config"]) if isinstance(desc["config"], dict) else {}
        keys = sorted(config) or ["x"]
        key = rng.choice(keys) if kind == "config" else rng.choice(HOSTILE_STRINGS)
        config[key] = rng.choice(JUNK + [[20000, 20000], [10**6] * 4, "uint8", "gelu"])
    elif kind == "tensor_kind":
        for info in desc["tensors"].values():
            info["kind"] = rng.choice(["param", "buffer", "qparams", "pickle", None])
    else:
        desc["training"] = rng.choice(JUNK)


def _tensor_mutation(rng, tensors):
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    kind = rng.choice(["dtype", "unsqueeze", "grow", "flatten"])
    if kind == "dtype":
        dtype = rng.choice(
            [
                torch.float16,
                torch.float64,
                torch.int64,
                torch.int32,
                torch.int8,
                torch.uint8,
                torch.bool,
                torch.bfloat16,
            ]
        )
        if dtype == t.dtype:
            dtype = torch.float16 if t.dtype != torch.float16 else torch.float32
        tensors[key] = t.to(dtype)
    elif kind == "unsqueeze":
        tensors[key] = t.unsqueeze(0)
    elif kind == "grow":
        tensors[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else t.reshape(1, 0)
    else:
        tensors[key] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)


def test_fuzzed_files_load_equal_or_fail_cleanly(saved, tmp_path, monkeypatch):
    path, expected, x = saved
    monkeypatch.chdir(tmp_path)
    original, _ = read(path)
    before = process_state()
    outcomes = {"refused": 0, "equal": 0}
    for seed in range(MUTATIONS_PER_FILE):
        rng = random.Random(seed)
        doc = copy.deepcopy(original)
        family = rng.choice(["node", "node", "module", "tensor", "document"])
        edit_tensors = None
        text = None
        if family == "node":
            _node_mutation(rng, doc)
        elif family == "module":
            _module_mutation(rng, doc)
        elif family == "tensor":
            edit_tensors = lambda ts, r=rng: _tensor_mutation(r, ts)  # noqa: E731
        else:
            key = rng.choice(["nodes", "modules", "attrs", "input", "qconfig", "report", "keep_float"])
            doc[key] = rng.choice(JUNK)
            if rng.random() < 0.2:
                text = json.dumps(doc)[: rng.randrange(10, 2000)]
        mutated = craft(
            path, tmp_path / f"m{seed}.fxq", lambda d, new=doc: (d.clear(), d.update(new)), edit_tensors, text=text
        )
        try:
            qm = load(mutated)
        except SerializeError:
            outcomes["refused"] += 1
        else:
            with torch.no_grad():
                assert torch.equal(qm(x), expected), f"seed {seed} ({family}) loaded and changed the output"
            outcomes["equal"] += 1
        assert process_state() == before, f"seed {seed} ({family}) changed process-wide torch state"
        assert not (tmp_path / CANARY).exists(), f"seed {seed} ({family}) wrote the canary"
        mutated.unlink()
    assert outcomes["refused"] > MUTATIONS_PER_FILE * 0.8, outcomes
