"""fxquant.io.serialize: save/load a compiled fake-quant model as safetensors + JSON, no pickle."""

import json
import pickle

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxquant
from fxquant.errors import FxqError
from fxquant.io.serialize import DOC_KEY, FORMAT_VERSION, HASH_KEY, SerializeError, load, save

timm = pytest.importorskip("timm")

MODELS = {
    "vit": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10),
        32,
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10),
        56,
    ),
}


@pytest.fixture(
    scope="module",
    params=[(m, q, b) for m in sorted(MODELS) for q in ("w8a8", "fqvit_w8a8") for b in ("fake", "int")],
    ids=lambda p: "-".join(p),
)
def compiled(request):
    model_key, qconfig, backend = request.param
    name, kwargs, size = MODELS[model_key]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    calib = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    qm = fxquant.compile(model, qconfig, calib_data=calib, progress=False, backend=backend)
    return qm, size


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    name, kwargs, size = MODELS["vit"]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    qm = fxquant.compile(model, "w8a8", calib_data=torch.randn(2, 3, size, size), progress=False)
    return save(qm, tmp_path_factory.mktemp("fxq") / "vit.fxq")


def _rewrite(src, dst, edit):
    """Rewrite a saved file with its document edited and a consistent hash (a 'well-formed' foreign file)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    document = json.loads(meta[DOC_KEY])
    edit(document)
    text = json.dumps(document)
    save_file(tensors, str(dst), metadata={DOC_KEY: text, HASH_KEY: hashlib.sha256(text.encode()).hexdigest()})
    return dst


@torch.no_grad()
def test_round_trip_is_bit_exact(compiled, tmp_path):
    qm, size = compiled
    path = save(qm, tmp_path / "model.fxq")
    loaded = load(path)
    assert isinstance(loaded, fx.GraphModule)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    assert torch.equal(qm(x), loaded(x))
    assert loaded.report.to_dict() == qm.report.to_dict()
    assert loaded.qconfig.to_dict() == qm.qconfig.to_dict()
    assert loaded.keep_float == qm.keep_float
    original = qm.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in qm.graph.nodes]
    for a, b in zip(qm.graph.nodes, loaded.graph.nodes):
        assert {k: v for k, v in a.meta.items() if k.startswith("fxq.")} == {
            k: v for k, v in b.meta.items() if k.startswith("fxq.")
        }, a.name
    # a loaded model saves to the same document again
    again = load(save(loaded, tmp_path / "again.fxq"))
    assert torch.equal(again(x), qm(x))


def test_load_runs_no_pickle(vit_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle or torch.load was called during fxquant.io.serialize.load")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load(vit_file)
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_truncated_file_fails_clearly(vit_file, tmp_path):
    data = vit_file.read_bytes()
    for cut in (len(data) // 2, 100, 4):
        broken = tmp_path / f"cut{cut}.fxq"
        broken.write_bytes(data[:cut])
        with pytest.raises(FxqError, match="truncated or corrupted"):
            load(broken)


def test_altered_header_fails_clearly(vit_file, tmp_path):
    data = vit_file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len]
    assert b'\\"qmax\\":127' in header
    altered = tmp_path / "altered.fxq"
    altered.write_bytes(data[:8] + header.replace(b'\\"qmax\\":127', b'\\"qmax\\":125', 1) + data[8 + header_len :])
    with pytest.raises(SerializeError, match="SHA-256 does not match: the file was altered"):
        load(altered)


def test_altered_tensor_data_fails_clearly(vit_file, tmp_path):
    data = bytearray(vit_file.read_bytes())
    data[-3] ^= 0xFF
    altered = tmp_path / "flipped.fxq"
    altered.write_bytes(bytes(data))
    with pytest.raises(SerializeError, match="tensor data's SHA-256 does not match"):
        load(altered)


def test_other_format_version_fails_clearly(vit_file, tmp_path):
    def bump(doc):
        doc["format_version"] = FORMAT_VERSION + 1
        doc["fxquant_version"] = "9.9.9"

    path = _rewrite(vit_file, tmp_path / "future.fxq", bump)
    with pytest.raises(
        SerializeError,
        match=rf"format version {FORMAT_VERSION + 1} \(fxquant '9.9.9'\).*reads format version {FORMAT_VERSION}",
    ):
        load(path)


def test_not_an_fxquant_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(SerializeError, match="without an fxquant document"):
        load(path)
    with pytest.raises(SerializeError, match="no such file"):
        load(tmp_path / "missing.fxq")


def test_disallowed_call_target_is_refused(vit_file, tmp_path):
    def evil(doc):
        node = next(n for n in doc["nodes"] if n["op"] == "call_function")
        node["target"] = "os:system"

    with pytest.raises(SerializeError, match="'os:system' is not allowed"):
        load(_rewrite(vit_file, tmp_path / "evil.fxq", evil))

    def evil_torch(doc):
        node = next(n for n in doc["nodes"] if n["op"] == "call_function")
        node["target"] = "torch:load"

    with pytest.raises(SerializeError, match="'torch:load' is not allowed"):
        load(_rewrite(vit_file, tmp_path / "evil2.fxq", evil_torch))


def test_disallowed_module_type_is_refused(vit_file, tmp_path):
    def evil(doc):
        desc = next(iter(doc["modules"].values()))
        desc["type"] = "subprocess.Popen"

    with pytest.raises(SerializeError, match="module type 'subprocess.Popen' is not supported"):
        load(_rewrite(vit_file, tmp_path / "evil.fxq", evil))


def test_private_getattr_is_refused(vit_file, tmp_path):
    def evil(doc):
        node = next(n for n in doc["nodes"] if n["target"] == "builtins:getattr")
        node["args"]["v"][1] = "__class__"

    with pytest.raises(SerializeError, match="getattr may only read"):
        load(_rewrite(vit_file, tmp_path / "evil.fxq", evil))


def test_unsupported_module_type_is_named_on_save(tmp_path):
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(SerializeError, match=r"torch\.nn\.modules\.activation\.ReLU is not supported"):
        save(gm, tmp_path / "relu.fxq")
    with pytest.raises(SerializeError, match="expects a torch.fx.GraphModule"):
        save(nn.Linear(2, 2), tmp_path / "x.fxq")


def test_file_from_another_fxquant_version_is_refused(tmp_path, monkeypatch):
    import fxquant.io.serial_read as serial_read

    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=10
    ).eval()
    qm = fxquant.compile(model, "seed_attn", calib_data=torch.randn(4, 3, 32, 32), progress=False)
    path = fxquant.save(qm, tmp_path / "m.fxq")
    monkeypatch.setattr(serial_read, "_fxquant_version", lambda: "9.9.9")
    with pytest.raises(fxquant.SerializeError, match=r"written by fxquant '0\.1\.0', this is fxquant 9\.9\.9"):
        fxquant.load(path)
