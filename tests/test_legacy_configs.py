"""The predecessor's config formats (BicMak/Quant_trainning): each loads by its shape, maps onto
fxquant's points, compiles, warns where meanings differ, converts to an equal qconfig, and a
misspelling fails naming file, key and the allowed names.

The files are written here with the keys and values of the predecessor's own files: its last
``configs/`` (five files), ``quant_config_int8.yaml`` (commit 9e98569, and 4860d2a with its
``kv_bins``) and the split files (commit 7e52d24).
"""

from __future__ import annotations

import operator
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml
from tiny import TINY_VIT, images

import fxquant
from fxquant.cli.app import main
from fxquant.errors import QConfigError
from fxquant.ir.meta import MODULE, POINT
from fxquant.quant.legacy_formats import LegacyConfigWarning
from fxquant.quant.qconfig import ACT, load_qconfig


def s(mode, symmetric, observer, alpha, sigma, **extra):
    """One setting as the predecessor's last files write it."""
    return {
        "calibration_mode": mode,
        "bit_type": {"bits": 8, "symmetric": symmetric, "name": "int8"},
        "observer_type": observer,
        "quantization_method": "Uniform",
        "percentile_alpha": alpha,
        "percentile_sigma": sigma,
        "kl_bins": 2048,
        "enable_profiler": True,
        **extra,
    }


CW, LW, MM, PC, OM = "channel_wise", "layer_wise", "MinmaxObserver", "PercentileObserver", "OmseObserver"
CURRENT = {  # configs/ at the predecessor's last commit, key for key
    "attn_config.yaml": {
        "attn_qkv": {
            "weight": s(CW, True, MM, 0.9995, 0.1),
            "output": s(LW, False, PC, 0.99995, 0.2, output_quant_enable=False),
        },
        "attn_proj": {
            "weight": s(CW, True, PC, 0.9995, 0.1),
            "output": s(LW, False, MM, 0.999, 0.2, output_quant_enable=True),
        },
        "attn_q_out": s(CW, True, PC, 0.99995, 0.01),
        "attn_k_out": s(CW, False, PC, 0.99995, 0.1),
        "attn_v_input": s(CW, False, PC, 0.99995, 0.1),
        "attn_kv_out": s(CW, False, PC, 0.99995, 0.1),
        "attn_v_out": s(CW, True, PC, 0.99995, 0.05),
        "intSoft": s(CW, False, OM, 0.9995, 0.1),
    },
    "mlp_config.yaml": {
        "mlp_fc1": {
            "weight": s(CW, True, MM, 0.9995, 0.1),
            "output": s(LW, False, MM, 0.999, 0.2, output_quant_enable=False),
        },
        "mlp_fc2": {
            "weight": s(CW, True, MM, 0.9995, 0.1),
            "output": s(CW, True, OM, 0.99995, 0.1, output_quant_enable=True),
        },
        "mlp_gelu": s(CW, False, OM, 0.99995, 0.1),
    },
    "block_config.yaml": {
        "norm1": s(LW, False, MM, 0.9999, 0.1),
        "norm2": s(LW, False, MM, 0.9999, 0.1),
        "residual1": s(CW, True, MM, 0.9999, 0.1),
        "residual2": s(CW, True, MM, 0.9999, 0.1),
    },
    "embed_config.yaml": {
        "outputs": s(CW, False, MM, 0.9995, 0.1, output_quant_enable=False),
        "weight": s(CW, True, MM, 0.9999, 0.01),
        "activation": s(CW, False, MM, 0.9995, 0.1),
        "norm": s(CW, False, MM, 0.9995, 0.1),
        "intsoft": s(CW, False, MM, 0.9995, 0.1),
    },
    "head_config.yaml": {
        "final_norm": s(LW, False, MM, 0.9999, 0.1),
        "head": {
            "weight": s(CW, True, MM, 0.9995, 0.1),
            "output": s(LW, False, MM, 0.9999, 0.1, output_quant_enable=True),
        },
    },
}


def old(mode, bits, observer, alpha, sigma, **extra):
    """One setting as the single and split files write it (``signed``, no profiler)."""
    return {
        "calibration_mode": mode,
        "bit_type": {"bits": bits, "signed": True, "name": f"int{bits}"},
        "observer_type": observer,
        "quantization_method": "Uniform",
        "percentile_alpha": alpha,
        "percentile_sigma": sigma,
        **extra,
    }


SINGLE = {  # quant_config_int8.yaml, commit 9e98569, key for key
    "default": old(CW, 8, PC, 0.999, 0.01, kl_bins=2048),
    "layers": {
        "attn_qkv": old(CW, 8, OM, 0.999, 0.05),
        "attn_proj": old(CW, 8, MM, 0.995, 0.1),
        "mlp_fc1": old(CW, 8, PC, 0.999, 0.2),
        "mlp_fc2": old(CW, 8, PC, 0.999, 0.2),
        "norm1": old(CW, 8, MM, 0.999, 0.01),
        "norm2": old(CW, 8, MM, 0.999, 0.01),
    },
    "attn_layer": {
        "attn_qkv_output": old(CW, 8, OM, 0.9995, 0.1),
        "kv_act": old(CW, 16, OM, 0.9999, 0.1),
        "sv_attn": old(CW, 16, OM, 0.9999, 0.1),
        "mlp_act": old(CW, 16, OM, 0.99999, 0.2),
        "mlp_act2": old(CW, 16, OM, 0.99999, 0.2),
        "intSoft": old(LW, 16, PC, 0.99, 0.01),
    },
    "residual_layer": {
        "residual1": old(LW, 8, PC, 0.99, 0.01),
        "residual2": old(LW, 8, PC, 0.98, 0.01),
    },
}
SPLIT = {  # weight/activation/residual_config.yaml, commit 7e52d24 (a few names left out: default fills them)
    "weight_config.yaml": {
        "default": old(CW, 8, PC, 0.999, 0.01, kl_bins=2048),
        "layers": {name: old(CW, 8, PC, 0.999, 0.2) for name in ("attn_qkv", "attn_proj", "mlp_fc1", "norm1")},
    },
    "activation_config.yaml": {
        "default": old(CW, 8, MM, 0.9995, 0.1, kl_bins=2048),
        "attn_layer": {
            **{name: old(CW, 16, MM, 0.999, 0.2) for name in ("attn_qkv_output", "kv_act", "sv_attn", "mlp_act")},
            "intSoft": old(LW, 4, MM, 0.999, 0.2),
        },
    },
    "residual_config.yaml": {
        "default": old(LW, 8, PC, 0.99, 0.01, kl_bins=2048),
        "residual_layer": {"residual1": old(LW, 8, PC, 0.99, 0.01), "residual2": old(LW, 8, PC, 0.98, 0.01)},
    },
}


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def formats(tmp_path: Path) -> dict[str, Path]:
    """Every format, written: the five current files, the single file, its early version, the split files."""
    early = {**SINGLE, "default": {**SINGLE["default"], "kv_bins": 2048}}
    early.pop("residual_layer")  # names it lacks take default, as the predecessor did
    return {
        "current": write_files(tmp_path / "current", CURRENT),
        "single": write_files(tmp_path / "single", {"quant_config_int8.yaml": SINGLE}) / "quant_config_int8.yaml",
        "single_early": write_files(tmp_path / "early", {"quant_config_int8.yaml": early}) / "quant_config_int8.yaml",
        "split": write_files(tmp_path / "split", SPLIT),
        "embed_alone": write_files(tmp_path / "embed", {"embed_config.yaml": CURRENT["embed_config.yaml"]})
        / "embed_config.yaml",
    }


def load(path) -> tuple:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_qconfig(path)
    return config, [str(w.message) for w in caught if issubclass(w.category, LegacyConfigWarning)]


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


def compiled(config):
    return fxquant.compile(tiny_vit(), config, calib_data=images(8, 32), progress=False)


def configured_labels(config) -> set[str]:
    """Every point label the config quantizes (group, or group.section for a Linear)."""
    labels = set()
    for group, sections in config.groups.items():
        for section in sections:
            if config.spec_for(group, section) is not None:
                labels.add(group if section == ACT else f"{group}.{section}")
    return labels


# ------------------------------------------------------------------------ the current five files
def test_current_five_files_load_map_and_compile(tmp_path):
    config, messages = load(formats(tmp_path)["current"])
    assert len(messages) == 5  # one warning per file, each naming its file
    for name in CURRENT:
        assert sum(name in m for m in messages) == 1, name
    attn = next(m for m in messages if "attn_config.yaml" in m)
    assert "attn_q_out.calibration_mode" in attn and "head_wise" in attn
    assert "attn_q_out.percentile_sigma" in attn and "0.99" in attn and "intSoft.quantization_method" in attn
    embed = next(m for m in messages if "embed_config.yaml" in m)
    assert "patch_embed.output" in embed

    q = config.spec_for("attn_q_out", ACT)
    assert (q.granularity, q.observer, q.signed, q.option("percentile_sigma", None)) == (
        "head_wise",
        "percentile",
        True,
        0.99,
    )
    assert config.spec_for("attn_kv_out", ACT).granularity == "head_wise"  # per head of (B, heads, N, N)
    soft = config.spec_for("intSoft", ACT)
    assert (soft.method, soft.signed, soft.bits) == ("log2", False, 8)
    assert config.spec_for("attn_qkv", "output") is None and config.spec_for("mlp_fc1", "output") is None
    assert config.spec_for("mlp_fc2", "output").observer == "omse"
    assert config.spec_for("patch_embed", "output").granularity == "channel_wise"
    assert config.spec_for("patch_embed", "weight") is None  # the predecessor never quantized it
    assert config.spec_for("residual1", ACT).granularity == "channel_wise"

    qm = compiled(config)
    assert torch.isfinite(qm(images(2, 32, seed=3))).all()
    report_labels = {n["group"] for n in qm.report.quant_points()}
    assert configured_labels(config) <= report_labels  # every configured point is in the report
    first, second = residual_adds(qm)
    assert first and second and not first & second
    assert len(first) == len(second) == TINY_VIT["depth"]


def residual_adds(gm) -> tuple[set[str], set[str]]:
    """(nodes of residual1, nodes of residual2); each must be its block's first / second add."""
    by_group: dict[str, set[str]] = {"residual1": set(), "residual2": set()}
    order: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target is operator.add
            and node.meta.get(MODULE, "").startswith("blocks.")
        ):
            order.setdefault(node.meta[MODULE], []).append(node.name)
        point = getattr(gm.get_submodule(node.target), "point", None) if node.op == "call_module" else None
        if point is not None and point.group in by_group:  # the fake-quantize node after the add
            by_group[point.group].add(node.args[0].name)
    for adds in order.values():
        assert adds[0] in by_group["residual1"] and adds[1] in by_group["residual2"]
    return by_group["residual1"], by_group["residual2"]


def test_residual1_sets_the_first_add_apart_in_fxquants_own_schema():
    config = load_qconfig({"residual": {"bits": 8}, "residual1": {"bits": 6}})
    gm = fxquant.compile(tiny_vit(), config, calib_data=images(4, 32), progress=False, numeric_diff=False)
    adds = [n for n in gm.graph.nodes if n.meta.get(POINT) is not None and n.meta[POINT].group.startswith("residual")]
    assert [n.meta[POINT].group for n in adds] == ["residual1", "residual"] * TINY_VIT["depth"]
    assert [n.meta[POINT].spec.bits for n in adds] == [6, 8] * TINY_VIT["depth"]


# ------------------------------------------------------------------------------- older formats
def test_single_file_maps_every_name_and_fills_from_default(tmp_path):
    config, messages = load(formats(tmp_path)["single"])
    assert len(messages) == 1 and "quant_config_int8.yaml" in messages[0]
    assert "layers.attn_qkv: the predecessor's QuantLinear also quantized" in messages[0]
    assert config.spec_for("attn_qkv", "weight").observer == "omse"
    out = config.spec_for("attn_qkv", "output")  # attn_qkv_output's setting, the last quantizer of that tensor
    assert (out.observer, out.granularity, out.bits) == ("omse", "channel_wise", 8)
    assert (
        config.spec_for("attn_kv_out", ACT).bits == 16
        and config.spec_for("attn_kv_out", ACT).granularity == "head_wise"
    )
    assert config.spec_for("attn_proj", "output").bits == 16  # sv_attn quantized attn.proj's output
    assert config.spec_for("mlp_fc2", "output").bits == 16 and config.spec_for("mlp_gelu", ACT).bits == 16
    assert config.spec_for("mlp_fc1", "output").option("percentile_sigma", None) == 0.8  # layers.mlp_fc1 on its output
    assert config.spec_for("norm1", ACT).granularity == "layer_wise"
    assert config.spec_for("attn_q_out", ACT) is None  # the old block never quantized q, k, v apart
    r1, r2 = config.spec_for("residual1", ACT), config.spec_for("residual2", ACT)
    assert (r1.option("percentile_alpha", None), r2.option("percentile_alpha", None)) == (0.99, 0.98)


def test_single_file_early_version_defaults_fill_missing_names(tmp_path):
    config, messages = load(formats(tmp_path)["single_early"])
    assert len(messages) == 1
    residual = config.spec_for("residual1", ACT)  # no residual_layer: default (channel_wise percentile 0.999)
    assert (residual.granularity, residual.observer, residual.option("percentile_alpha", None)) == (
        "channel_wise",
        "percentile",
        0.999,
    )
    assert config.spec_for("residual2", ACT) == residual


def test_split_files_use_each_files_default_then_the_first(tmp_path):
    config, messages = load(formats(tmp_path)["split"])
    assert {Path(m.split(":")[0]).name for m in messages} == set(SPLIT)
    # mlp_fc2 and mlp_act2 are in no file: the first (weight) file's default, not the activation file's
    assert config.spec_for("mlp_fc2", "weight").option("percentile_sigma", None) == 0.99
    assert config.spec_for("mlp_fc2", "output").observer == "percentile"
    assert config.spec_for("mlp_gelu", ACT).observer == "minmax"  # mlp_act: its own file's default
    soft = config.spec_for("intSoft", ACT)
    assert (soft.method, soft.bits) == ("log2", 4)
    assert config.spec_for("residual2", ACT).option("percentile_alpha", None) == 0.98


@pytest.mark.parametrize("name", ["current", "single", "single_early", "split"])
def test_each_format_compiles_the_model(tmp_path, name):
    config, _ = load(formats(tmp_path)[name])
    qm = compiled(config)
    assert torch.isfinite(qm(images(2, 32, seed=3))).all()
    assert configured_labels(config) <= {n["group"] for n in qm.report.quant_points()}


# -------------------------------------------------------------------------- convert-config
def setting_paths(data, prefix=""):
    """The key path of every predecessor key under ``data`` (bit_type counted as one key)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "bit_type":
            yield from setting_paths(value, path + ".")
        else:
            yield path


@pytest.mark.parametrize("name", ["current", "single", "single_early", "split", "embed_alone"])
def test_convert_config_round_trip(tmp_path, name, capsys):
    original = formats(tmp_path)[name]
    converted = tmp_path / "converted.yaml"
    assert main(["convert-config", str(original), "-o", str(converted)]) == 0
    assert str(converted) in capsys.readouterr().out
    new, messages = load(converted)
    assert messages == []  # the converted file is fxquant's schema: nothing left to warn about
    assert new == load(original)[0]
    assert new.source != load(original)[0].source
    text = converted.read_text()
    files = [original] if original.is_file() else sorted(original.glob("*.yaml"))
    for file in files:  # a comment for every key of every file (a dropped section: one for the section)
        for path in setting_paths(yaml.safe_load(file.read_text())):
            if not path.startswith("default"):  # default's keys are commented where they fill a setting
                section = path.split(".")[0]
                dropped = [x for x in text.splitlines() if "never read" in x and re.search(rf" {section}[,:]", x)]
                assert path in text or dropped, (file.name, path)
    assert "[differs]" in text


def test_convert_config_refuses_fxquants_own_schema(tmp_path, capsys):
    native = tmp_path / "mine.yaml"
    native.write_text("attn_q_out: {bits: 8, signed: false}\n")
    assert main(["convert-config", str(native), "-o", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert "mine.yaml" in err and "already is an fxquant qconfig" in err
    assert not (tmp_path / "out.yaml").exists()


def test_convert_config_needs_an_output(tmp_path, capsys):
    old_file = formats(tmp_path)["single"]
    assert main(["convert-config", str(old_file)]) == 2
    assert "-o" in capsys.readouterr().err


def test_convert_config_missing_input(tmp_path, capsys):
    assert main(["convert-config", str(tmp_path / "nope"), "-o", str(tmp_path / "out.yaml")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ misspellings
MISSPELLED = {
    "per-part group": (
        lambda t: write_files(
            t / "a", {"block_config.yaml": {**CURRENT["block_config.yaml"], "residul1": s(LW, True, MM, 0.9, 0.1)}}
        ),
        "residul1",
        "residual1",
    ),
    "per-part key": (
        lambda t: write_files(
            t / "b", {"block_config.yaml": {"norm1": {**s(LW, True, MM, 0.9, 0.1), "observer_tpye": MM}}}
        ),
        "norm1.observer_tpye",
        "observer_type",
    ),
    "per-part bit_type key": (
        lambda t: write_files(
            t / "c", {"head_config.yaml": {"final_norm": {**s(LW, True, MM, 0.9, 0.1), "bit_type": {"bitz": 8}}}}
        ),
        "final_norm.bit_type.bitz",
        "symmetric",
    ),
    "global key": (
        lambda t: write_files(t / "d", {"embed_config.yaml": {**CURRENT["embed_config.yaml"], "activaton": {}}}),
        "activaton",
        "activation",
    ),
    "single-file name": (
        lambda t: (
            write_files(t / "e", {"q.yaml": {**SINGLE, "attn_layer": {"kv_actt": old(LW, 8, MM, 0.9, 0.1)}}}) / "q.yaml"
        ),
        "attn_layer.kv_actt",
        "kv_act",
    ),
    "single-file section": (
        lambda t: write_files(t / "f", {"q.yaml": {"default": SINGLE["default"], "attn_layers": {}}}) / "q.yaml",
        "attn_layers",
        "attn_layer",
    ),
    "single-file key": (
        lambda t: write_files(t / "g", {"q.yaml": {"layers": {"norm1": {"percentil_alpha": 0.9}}}}) / "q.yaml",
        "layers.norm1.percentil_alpha",
        "percentile_alpha",
    ),
    "split-file name": (
        lambda t: write_files(t / "h", {**SPLIT, "residual_config.yaml": {"residual_layer": {"residual3": {}}}}),
        "residual_layer.residual3",
        "residual2",
    ),
    "observer value": (
        lambda t: write_files(t / "i", {"q.yaml": {"default": {"observer_type": "PercnetileObserver"}}}) / "q.yaml",
        "default.observer_type",
        "PercentileObserver",
    ),
}


@pytest.mark.parametrize("case", list(MISSPELLED))
def test_misspelling_names_file_key_and_allowed(tmp_path, case):
    make, key, allowed = MISSPELLED[case]
    path = make(tmp_path)
    with pytest.raises(QConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyConfigWarning)
        load_qconfig(path)
    message = str(info.value)
    assert f"{key}:" in message and allowed in message, message
    assert (path.name if path.is_file() else ".yaml") in message and str(tmp_path) in message, message


def test_mixed_style_file_stays_fxquants_schema(tmp_path):
    """A setting with fxquant's own keys is fxquant's: no predecessor reading, no warning."""
    path = write_files(tmp_path, {"mine.yaml": {"norm1": {**s(LW, False, PC, 0.99, 0.1), "bits": 8}}}) / "mine.yaml"
    config, messages = load(path)
    assert messages == [] and config.spec_for("norm1", ACT).option("percentile_sigma", None) == 0.1


@pytest.mark.slow
def test_current_five_files_on_vit_base(tmp_path):
    """The acceptance check on the full-size model: vit_base_patch16_224, random init."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224").eval()
    config, _ = load(formats(tmp_path)["current"])
    calib = images(4, 224)
    qm = fxquant.compile(model, config, calib_data=calib, progress=False)
    assert torch.isfinite(qm(calib[:2])).all()
    assert configured_labels(config) <= {n["group"] for n in qm.report.quant_points()}
    first, second = residual_adds(qm)
    assert len(first) == len(second) == 12 and not first & second
