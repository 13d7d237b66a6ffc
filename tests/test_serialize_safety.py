"""Crafted .fxq files (document and tensors edited, every digest recomputed) fail with a
SerializeError, run nothing, write nothing, change no process-wide torch state."""

import json
import subprocess
import sys

import pytest
import torch
from serialize_craft import craft, nodes_of, process_state, read

import fxquant
from fxquant.io.serialize import SerializeError, load, save

timm = pytest.importorskip("timm")

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10)


@pytest.fixture(scope="module", params=["fake", "int"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, "w8a8", calib_data=x, progress=False, backend=request.param, numeric_diff=False)
    return save(qm, tmp_path_factory.mktemp("safe") / "vit.fxq"), qm(x), x


def _refused(path, match=None):
    before = process_state()
    with pytest.raises(SerializeError, match=match):
        load(path)
    assert process_state() == before


def test_kwargs_key_cannot_inject_code(saved, tmp_path):
    canary = tmp_path / "canary"
    for key in (f"alpha = __import__('os').system('touch {canary}') + 1, other", "a b (", "lambda", "x=1"):

        def edit(doc):
            node = nodes_of(doc, "call_function")[0]
            node["kwargs"] = {"$": "dict", "v": [[key, 1]]}

        _refused(craft(saved[0], tmp_path / "kw.fxq", edit), "keyword argument")
    assert not canary.exists()


@pytest.mark.parametrize(
    "method",
    [
        "numpy",
        "tofile",
        "untyped_storage",
        "copy_",
        "data_ptr",
        "__class__",
        "share_memory_",
        "set_",
        "resize_",
        "tolist",
    ],
)
def test_only_pure_tensor_methods(saved, tmp_path, method):
    def edit(doc):
        nodes_of(doc, "call_method")[0]["target"] = method

    _refused(craft(saved[0], tmp_path / "m.fxq", edit), "tensor method")


@pytest.mark.parametrize(
    "target",
    [
        "torch:set_default_dtype",
        "torch:set_default_device",
        "torch:set_num_threads",
        "torch:manual_seed",
        "torch:use_deterministic_algorithms",
        "torch:set_flush_denormal",
        "torch:set_printoptions",
        "torch:from_file",
        "torch:zeros",
        "builtins:eval",
        "builtins:exec",
        "os:system",
        "torch:load",
    ],
)
def test_no_global_state_io_or_allocation_functions(saved, tmp_path, target):
    def edit(doc):
        nodes_of(doc, "call_function")[0]["target"] = target

    _refused(craft(saved[0], tmp_path / "f.fxq", edit), "not allowed")


def test_names_are_identifiers(saved, tmp_path):
    for field, value in (("name", "x; import os"), ("name", "def"), ("target", "os.system")):

        def edit(doc):
            node = nodes_of(doc, "placeholder")[0] if field == "name" else nodes_of(doc, "call_module")[0]
            node[field] = value

        _refused(craft(saved[0], tmp_path / "n.fxq", edit))


def test_module_configs_allocate_nothing(saved, tmp_path):
    def huge_layernorm(doc):
        desc = next(d for d in doc["modules"].values() if d["type"].endswith("LayerNorm"))
        desc["config"]["normalized_shape"] = [20000, 20000]

    _refused(craft(saved[0], tmp_path / "ln.fxq", huge_layernorm), "declares")


@pytest.mark.parametrize("change", ["fp16", "int64", "shape", "int32_codes"])
def test_mismatched_tensors_fail_at_load(saved, tmp_path, change):
    document, tensors = read(saved[0])
    codes = [k for k in tensors if k.endswith(":weight_codes")]
    weights = [k for k in tensors if k.endswith(":weight") or k.endswith(":out_bias")]

    def edit_tensors(ts):
        key = codes[0] if change == "int32_codes" else weights[0]
        if change == "fp16":
            ts[key] = ts[key].half()
        elif change == "int64":
            ts[key] = ts[key].long()
        elif change == "int32_codes":
            ts[key] = ts[key].int()
        else:
            ts[key] = torch.cat([ts[key], ts[key][:1]])

    _refused(craft(saved[0], tmp_path / "t.fxq", edit_tensors=edit_tensors), "tensor")


def test_embedded_qconfig_cannot_name_a_path(saved, tmp_path):
    def edit(doc):
        doc["qconfig"]["dict"]["v"].append(["extends", "/etc/passwd"])

    _refused(craft(saved[0], tmp_path / "q.fxq", edit), "extends")


def test_deep_and_huge_documents(saved, tmp_path):
    _refused(craft(saved[0], tmp_path / "deep.fxq", text="[" * 100_000 + "]" * 100_000), "nested deeper")
    _refused(craft(saved[0], tmp_path / "many.fxq", text="[" + ",".join(["[]"] * 2_100_000) + "]"), "JSON lists")

    def deep_args(doc):
        value = 1
        for _ in range(200):
            value = [value]
        nodes_of(doc, "call_function")[0]["args"] = {"$": "tuple", "v": [value]}

    _refused(craft(saved[0], tmp_path / "deepargs.fxq", deep_args), "nested deeper")


def test_constant_sizes_are_bounded(saved, tmp_path):
    def edit(doc):
        node = nodes_of(doc, "call_method")[0]
        node["target"] = "expand"
        node["args"] = {"$": "tuple", "v": [node["args"]["v"][0], 100000, 100000, 100000]}

    _refused(craft(saved[0], tmp_path / "x.fxq", edit), "more than")


def test_load_runs_the_graph_once_and_names_a_failing_node(saved, tmp_path):
    def edit(doc):
        node = next(n for n in nodes_of(doc, "call_method") if n["target"] in ("reshape", "view"))
        node["args"]["v"] = [node["args"]["v"][0], 7, 7, 7]

    with pytest.raises(SerializeError, match="fails on an input of its saved shape .* at node"):
        load(craft(saved[0], tmp_path / "r.fxq", edit))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_memory_stays_small_on_hostile_files(saved, tmp_path):
    """Peak RSS of a process loading the hostile files stays far below 2 GB."""
    big = craft(saved[0], tmp_path / "huge.fxq", text="[" + ",".join(["[]"] * 1_900_000) + "]")

    def huge_linear(doc):
        desc = next(
            d
            for d in doc["modules"].values()
            if d["type"] in ("fxquant.QuantLinear", "torch.nn.Linear", "fxquant.IntLinear", "fxquant.OnednnLinear")
        )
        if "attrs" in desc["config"]:
            desc["config"]["attrs"]["out_features"] = 10**9
        else:
            desc["config"]["out_features"] = 10**9

    wide = craft(saved[0], tmp_path / "wide.fxq", huge_linear)
    # VmHWM, the peak RSS of this process's own memory map: unlike getrusage's ru_maxrss,
    # which a child started from a large process (pytest after a thousand tests, 2 GB)
    # inherits from its parent, it starts afresh at exec.
    code = (
        "import fxquant, re\n"
        f"for p in [{str(big)!r}, {str(wide)!r}]:\n"
        "    try: fxquant.load(p)\n"
        "    except fxquant.SerializeError: pass\n"
        "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"


def test_an_untouched_file_still_loads(saved):
    path, expected, x = saved
    before = process_state()
    assert torch.equal(load(path)(x), expected)
    assert process_state() == before
    assert json.loads(json.dumps(read(path)[0]["input"])) == {"shape": [3, 32, 32]}
