"""The registry of savable runtime modules (fxquant.runtime.savable / catalog) is the loader's
allowlist: every runtime module class that a compiled graph can hold is registered, the catalog
finds them all, and every registered type round-trips through save/load."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

import fxquant
import fxquant.runtime
from fxquant.io.serial_values import SerializeError
from fxquant.io.serialize import load, save
from fxquant.runtime import catalog
from fxquant.runtime.int_attention import kernel_ready, load_kernel
from fxquant.runtime.onednn import onednn_available
from fxquant.runtime.savable import Schema, TensorRule, savable, unregister
from tests.tiny import TINY_VIT, images

# runtime nn.Module classes that never reach a compiled graph, with the reason
NEVER_SAVED = {
    "fxquant.runtime.fake_quant.ObserverModule": "calibration only: lower_fake_quant replaces every observer",
}


def _runtime_module_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.iter_modules(fxquant.runtime.__path__, "fxquant.runtime."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__ and not name.startswith("_"):
                found[f"{cls.__module__}.{name}"] = cls
    return found


def test_every_runtime_module_class_is_registered_or_says_why_not():
    classes = _runtime_module_classes()
    registered = set(catalog.registered().values())
    unregistered = {path for path, cls in classes.items() if cls not in registered}
    assert unregistered == set(NEVER_SAVED), (
        f"runtime module classes neither @savable nor in NEVER_SAVED: {sorted(unregistered - set(NEVER_SAVED))}"
    )
    assert registered <= set(classes.values())  # nothing registered from outside fxquant.runtime


def test_the_catalog_alone_registers_every_class():
    """A process that imports only the catalog (what fxquant.load does) sees the full registry."""
    code = "import json, fxquant.runtime.catalog as c; print(json.dumps(sorted(c.registered())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    every = sorted(
        f"fxquant.{cls.__name__}" for cls in _runtime_module_classes().values() if hasattr(cls, "serial_schema")
    )
    assert json.loads(out.stdout) == every


def test_integer_module_types_are_the_plain_state_ones():
    names = {cls.__name__ for cls in catalog.integer_module_types()}
    assert {"QuantizeCodes", "DequantizeCodes", "IntLinear", "IntMatmul", "IntLayerNorm"} <= names
    assert not names & {"FakeQuantize", "QuantLinear", "QuantConv2d", "LogIntSoftmax", "LogBaseSoftmax", "FloatPoint"}


# ---------------------------------------------------------------- every type, saved and loaded
def _fqvit_softmax(method: str, bits: int) -> dict:
    """fqvit_w8a8 with another log quantizer of the attention probabilities (LogBaseSoftmax)."""
    return {"extends": "fqvit_w8a8", "intSoft": {"bits": bits, "quantization_method": method}}


def _compile_variants() -> list[tuple[str, dict]]:
    variants = [
        ("fake w8a8", dict(qconfig="w8a8")),
        ("fake fqvit_w8a8", dict(qconfig="fqvit_w8a8")),
        ("fake w8a8 keep_float=2", dict(qconfig="w8a8", keep_float=2)),
        # portable: the IntLinear (the default kernels are oneDNN's on x86)
        ("int fqvit_w8a8", dict(qconfig="fqvit_w8a8", backend="int", int_kernels="portable")),
        (
            "int w8a8 rotate fc2",
            dict(qconfig={"extends": "w8a8", "rotate": {"fc2": True}}, backend="int", int_kernels="portable"),
        ),
        ("fake fqvit_w8a8 log_adaptive", dict(qconfig=_fqvit_softmax("log_adaptive", 4))),
        ("int fqvit_w8a8 log_sqrt2", dict(qconfig=_fqvit_softmax("log_sqrt2", 8), backend="int")),
        ("int int8_all", dict(qconfig="int8_all", backend="int")),  # CodeLut: GELU between two points
    ]
    if onednn_available():
        variants.append(("int w8a8 onednn", dict(qconfig="w8a8", backend="int", int_kernels="onednn")))
        variants.append(("int fqvit_w8a8 onednn", dict(qconfig="fqvit_w8a8", backend="int", int_kernels="onednn")))
    return variants


@pytest.fixture(scope="module")
def compiled_variants():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    calib = images(8, 32)
    return {name: fxquant.compile(model, calib_data=calib, progress=False, **kw) for name, kw in _compile_variants()}


def _expected_types() -> set[str]:
    expected = set(catalog.registered())
    if not onednn_available():
        expected -= {"fxquant.OnednnLinear", "fxquant.IntAttention", "fxquant.IntLisAttention"}
    elif not (load_kernel() and kernel_ready()):  # no C++ toolchain: attention stays unfused
        expected -= {"fxquant.IntAttention"}
    return expected


def test_every_registered_type_round_trips(compiled_variants, tmp_path):
    seen: set[str] = set()
    x = images(2, 32, seed=5)
    for index, (name, qm) in enumerate(compiled_variants.items()):
        loaded = load(save(qm, tmp_path / f"{index}.fxq"))
        with torch.no_grad():
            assert torch.equal(loaded(x), qm(x)), name
        for path, module in qm.named_modules():
            key = f"fxquant.{type(module).__name__}"
            if key not in catalog.registered():
                continue
            seen.add(key)
            twin = loaded.get_submodule(path)
            assert type(twin) is type(module), (name, path)
            state, twin_state = module.state_dict(), twin.state_dict()
            assert state.keys() == twin_state.keys(), (name, path)
            for tensor_name, tensor in state.items():
                assert torch.equal(tensor, twin_state[tensor_name]), (name, path, tensor_name)
            declared = module.serial_schema.attrs
            for attr in declared:
                if hasattr(module, attr) and module.serial_schema.layout == "plain_state":
                    assert getattr(twin, attr) == getattr(module, attr) or getattr(module, attr) is None, (path, attr)
    assert seen == _expected_types(), f"registered types no variant exercised: {sorted(_expected_types() - seen)}"


# ---------------------------------------------------------------- a new module needs only the decorator
class _Offset(nn.Module):
    """A toy integer module: adds ``shift`` to int8 codes."""

    def __init__(self, shift: int):
        super().__init__()
        self.label, self.shift = "toy", shift
        self.register_buffer("step", torch.tensor(1.0))

    def forward(self, x):
        return x + self.shift * self.step


@pytest.fixture
def toy_module():
    cls = savable(
        Schema({"label": str, "shift": int}, {"step": TensorRule((torch.float32,), ndims=(0,), required=True)})
    )(_Offset)
    yield cls
    unregister(cls)


def _graph_with(module: nn.Module) -> fx.GraphModule:
    root = nn.Module()
    root.toy = module
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("toy", (x,)))
    gm = fx.GraphModule(root, graph)
    gm.example_input_shape = (1, 4)
    return gm


def test_a_newly_registered_module_saves_and_loads(toy_module, tmp_path):
    gm = _graph_with(toy_module(3))
    loaded = load(save(gm, tmp_path / "toy.fxq"))
    assert type(loaded.toy) is toy_module and loaded.toy.shift == 3 and loaded.toy.label == "toy"
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), gm(x))


def test_an_undeclared_attribute_is_refused_at_save_not_at_load(toy_module, tmp_path):
    module = toy_module(3)
    module.extra = 1
    with pytest.raises(SerializeError, match=r"attribute 'extra' of _Offset is not in its @savable schema"):
        save(_graph_with(module), tmp_path / "toy.fxq")


def test_registering_a_second_class_under_the_same_name_is_refused(toy_module):
    class _Offset(nn.Module):  # same class name, another class
        pass

    with pytest.raises(ValueError, match="already registered"):
        savable(Schema({}))(_Offset)


def test_a_schema_naming_an_undeclared_tensor_or_attribute_is_refused():
    with pytest.raises(ValueError, match="refers to 'scale'"):
        Schema({}, {"zero_point": TensorRule((torch.float32,), fits="scale")})
    with pytest.raises(ValueError, match="attribute 'out_features'"):
        Schema({}, {"bias": TensorRule((torch.float32,), rows="out_features")})
