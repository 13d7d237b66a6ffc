"""QConfig: the seed's YAML schema, its predecessor's keys, errors, extends/overrides/skip, presets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import fxquant
from fxquant.errors import QConfigError
from fxquant.quant.qconfig import ACT, ALL_GROUPS, LINEAR_GROUPS, LINEAR_SECTIONS, QConfig, load_qconfig
from fxquant.quant.spec import QuantSpec

# The seed document's attn_config.yaml, exactly its keys and values.
SEED_DOCUMENT = """\
attn_qkv:
  weight:
    calibration_mode: channel_wise
    observer_type: MinmaxObserver
    signed: True
    bits: 8
  output:
    output_quant_enable: False
attn_q_out:
  calibration_mode: layer_wise
  observer_type: MinmaxObserver
  signed: False
  bits: 8
attn_k_out:
  calibration_mode: layer_wise
  observer_type: MinmaxObserver
  signed: False
  bits: 8
attn_v_input:
  calibration_mode: layer_wise
  observer_type: MinmaxObserver
  signed: False
  bits: 8
"""

QKV_ACTIVATIONS = ("attn_q_out", "attn_k_out", "attn_v_input")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def sections_of(group: str) -> tuple[str, ...]:
    return LINEAR_SECTIONS if group in LINEAR_GROUPS else (ACT,)


def all_specs(config: QConfig, module: str = "") -> dict[tuple[str, str], QuantSpec | None]:
    return {(g, s): config.spec_for(g, s, module) for g in ALL_GROUPS for s in sections_of(g)}


# ------------------------------------------------------------------------ the seed schema
def test_seed_document_parses(tmp_path):
    config = load_qconfig(write(tmp_path, "attn_config.yaml", SEED_DOCUMENT))
    assert config.name == "attn_config"
    weight = config.spec_for("attn_qkv", "weight")
    assert weight == QuantSpec(bits=8, signed=True, symmetric=True, granularity="channel_wise", observer="minmax")
    assert config.spec_for("attn_qkv", "output") is None  # output_quant_enable: False
    for group in QKV_ACTIVATIONS:
        spec = config.spec_for(group, ACT)
        assert (spec.bits, spec.signed, spec.symmetric, spec.granularity, spec.observer, spec.method) == (
            8,
            False,
            False,
            "layer_wise",
            "minmax",
            "uniform",
        )
        assert (spec.qmin, spec.qmax) == (0, 255)


def test_seed_keys_percentile_and_method(tmp_path):
    path = write(
        tmp_path,
        "pct.yaml",
        """\
        attn_qkv:
          weight:
            calibration_mode: channel_wise
            observer_type: PercentileObserver
            percentile_alpha: 0.9995
            signed: True
            bits: 8
            quantization_method: uniform
          output:
            output_quant_enable: True
            calibration_mode: layer_wise
            observer_type: MinmaxObserver
            signed: True
            bits: 8
        intSoft:
          calibration_mode: layer_wise
          observer_type: MinmaxObserver
          signed: False
          bits: 4
          quantization_method: log2
        """,
    )
    config = load_qconfig(path)
    weight = config.spec_for("attn_qkv", "weight")
    assert weight.observer == "percentile" and weight.option("percentile_alpha", None) == 0.9995
    assert weight.method == "uniform"
    output = config.spec_for("attn_qkv", "output")
    assert output is not None and output.enabled and output.granularity == "layer_wise"
    soft = config.spec_for("intSoft", ACT)
    assert (soft.method, soft.bits, soft.signed) == ("log2", 4, False)


def test_predecessor_keys(tmp_path):
    path = write(
        tmp_path,
        "old.yaml",
        """\
        norm1:
          bit_type: {bits: 8, symmetric: False, name: uint8}
          observer_type: PercentileObserver
          percentile_sigma: 0.1
          calibration_mode: layer_wise
          quantization_method: Uniform
          enable_profiler: True
        attn_kv_out:
          bit_type: {bits: 8, symmetric: True, name: int8}
          observer_type: EmaObserver
          kl_bins: 2048
          calibration_mode: head_wise
          quantization_method: Uniform
        """,
    )
    config = load_qconfig(path)
    norm1 = config.spec_for("norm1", ACT)
    assert (norm1.bits, norm1.signed, norm1.symmetric) == (8, False, False)
    assert norm1.method == "uniform" and norm1.observer == "percentile"
    assert norm1.option("percentile_sigma", None) == 0.1 and norm1.option("enable_profiler", None) is True
    scores = config.spec_for("attn_kv_out", ACT)
    assert (scores.bits, scores.signed, scores.symmetric, scores.granularity) == (8, True, True, "head_wise")
    assert scores.observer == "ema" and scores.option("kl_bins", None) == 2048


def test_predecessor_bit_type_name_gives_bits(tmp_path):
    config = load_qconfig(write(tmp_path, "b.yaml", "norm2: {bit_type: {name: int4}}\n"))
    spec = config.spec_for("norm2", ACT)
    assert (spec.bits, spec.signed, spec.qmin, spec.qmax) == (4, True, -8, 7)


# ------------------------------------------------------------------------------ errors
def error_for(tmp_path, text: str, name: str = "bad.yaml") -> str:
    path = write(tmp_path, name, text)
    with pytest.raises(QConfigError) as info:
        load_qconfig(path)
    message = str(info.value)
    assert str(path) in message, message  # names the file
    assert "\n" not in message.strip(), message
    return message


def test_unknown_key_names_file_path_and_allowed(tmp_path):
    message = error_for(
        tmp_path,
        """\
        attn_qkv:
          weight:
            bits: 8
            observr_type: MinmaxObserver
        """,
    )
    assert "attn_qkv.weight.observr_type" in message
    assert "unknown key" in message
    for allowed in ("bits", "signed", "calibration_mode", "observer_type", "quantization_method"):
        assert allowed in message


def test_bad_observer_value(tmp_path):
    message = error_for(
        tmp_path,
        """\
        attn_q_out:
          observer_type: FooObserver
          bits: 8
        """,
    )
    assert "attn_q_out.observer_type" in message and "FooObserver" in message
    for allowed in ("MinmaxObserver", "EmaObserver", "PercentileObserver", "OmseObserver"):
        assert allowed in message


def test_bad_calibration_mode_value(tmp_path):
    message = error_for(tmp_path, "norm1: {calibration_mode: per_pixel}\n")
    assert "norm1.calibration_mode" in message
    for allowed in ("layer_wise", "channel_wise", "head_wise", "group_wise"):
        assert allowed in message


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("bits", '"8"', "2..16"),
        ("signed", '"yes"', "true, false"),
        ("bits", "8.5", "2..16"),
        ("percentile_alpha", "high", "0.5"),
    ],
)
def test_bad_type_names_key_and_allowed(tmp_path, key, value, allowed):
    message = error_for(
        tmp_path,
        f"""\
        mlp_fc1:
          weight:
            {key}: {value}
        """,
    )
    assert f"mlp_fc1.weight.{key}" in message
    assert allowed in message


def test_bits_out_of_range_names_the_key(tmp_path):
    message = error_for(tmp_path, "norm1: {bits: 32}\n")
    assert "norm1.bits" in message and "2..16" in message


def test_unknown_group(tmp_path):
    message = error_for(tmp_path, "attn_qkv_fused:\n  weight: {bits: 8}\n")
    assert "attn_qkv_fused" in message and "unknown group" in message
    for allowed in ("attn_qkv", "attn_q_out", "intSoft", "mlp_fc2"):
        assert allowed in message


def test_unknown_section_of_linear_group(tmp_path):
    message = error_for(tmp_path, "head:\n  bias: {bits: 8}\n")
    assert "head.bias" in message and "weight" in message and "output" in message


def test_kl_and_ptf_observers_parse(tmp_path):
    config = load_qconfig(
        write(
            tmp_path,
            "ok.yaml",
            "attn_kv_out: {observer_type: KLObserver, kl_bins: 512}\n"
            "norm1: {input: {observer_type: PtfObserver, calibration_mode: channel_wise}}\n",
        )
    )
    assert config.spec_for("attn_kv_out", "act").observer == "kl"
    assert config.spec_for("attn_kv_out", "act").option("kl_bins", None) == 512
    assert config.spec_for("norm1", "input").observer == "ptf"
    assert config.spec_for("norm1", "act") is None  # only the input is quantized


def test_ptf_needs_channel_wise(tmp_path):
    message = error_for(tmp_path, "norm2:\n  input: {observer_type: PtfObserver, calibration_mode: layer_wise}\n")
    assert "norm2.input" in message and "channel_wise" in message


def test_input_section_only_on_norm_groups(tmp_path):
    message = error_for(tmp_path, "mlp_gelu:\n  input: {bits: 8}\n")
    assert "mlp_gelu.input" in message and "norm1" in message


def test_norm_input_round_trips_through_to_dict(tmp_path):
    text = "norm1: {bits: 8, signed: false, input: {observer_type: PtfObserver, calibration_mode: channel_wise}}\n"
    config = load_qconfig(write(tmp_path, "ok.yaml", text))
    again = load_qconfig(config.to_dict())
    assert again.spec_for("norm1", "input") == config.spec_for("norm1", "input")
    assert again.spec_for("norm1", "act") == config.spec_for("norm1", "act")


def test_invalid_yaml_and_missing_file(tmp_path):
    message = error_for(tmp_path, "norm1: {bits: 8\n")
    assert "YAML" in message
    with pytest.raises(QConfigError, match="neither a preset"):
        load_qconfig(str(tmp_path / "nope.yaml"))


def test_error_in_override_names_its_path(tmp_path):
    message = error_for(
        tmp_path,
        """\
        overrides:
          "blocks.1.*":
            mlp_fc2:
              weight: {observer_type: FooObserver}
        """,
    )
    assert "overrides.blocks.1.*.mlp_fc2.weight.observer_type" in message


# ------------------------------------------------------------ extends / overrides / skip
def test_extends_merges_with_base(tmp_path):
    path = write(
        tmp_path,
        "mine.yaml",
        """\
        extends: w8a8
        intSoft:
          bits: 8
          signed: False
          calibration_mode: layer_wise
          observer_type: MinmaxObserver
          quantization_method: log2
        head:
          weight: {bits: 4, signed: True, calibration_mode: channel_wise, observer_type: MinmaxObserver}
        """,
    )
    config = load_qconfig(path)
    base = load_qconfig("w8a8")
    assert config.name == "mine"
    assert config.spec_for("intSoft", ACT).method == "log2"  # added
    assert base.spec_for("intSoft", ACT) is None
    assert config.spec_for("head", "weight").bits == 4  # replaced
    for key, spec in all_specs(base).items():  # everything else comes from the base
        if key not in (("intSoft", ACT), ("head", "weight")):
            assert config.spec_for(*key) == spec, key


def test_null_group_turns_a_base_group_off(tmp_path):
    path = write(tmp_path, "mine.yaml", "extends: w8a8\nattn_kv_out: null\nhead: false\n")
    config, base = load_qconfig(path), load_qconfig("w8a8")
    assert base.spec_for("attn_kv_out", ACT) is not None and base.spec_for("head", "weight") is not None
    assert config.spec_for("attn_kv_out", ACT) is None and config.spec_for("head", "weight") is None
    assert config.spec_for("attn_q_out", ACT) == base.spec_for("attn_q_out", ACT)  # the rest is the base's
    assert load_qconfig(config.to_dict()).spec_for("attn_kv_out", ACT) is None
    with pytest.raises(QConfigError, match=r"overrides\.blocks\.0\.\*\.attn_kv_out: null turns a group off only"):
        load_qconfig({"extends": "w8a8", "overrides": {"blocks.0.*": {"attn_kv_out": None}}})
    with pytest.raises(QConfigError, match="attn_kv_outt: unknown group"):
        load_qconfig({"extends": "w8a8", "attn_kv_outt": None})


def test_extends_unknown_base(tmp_path):
    with pytest.raises(QConfigError, match="neither a preset"):
        load_qconfig(write(tmp_path, "x.yaml", "extends: w3a3\n"))


def test_relative_extends_is_read_from_the_including_files_directory(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    (configs / "base").mkdir(parents=True)
    write(configs / "base", "common.yaml", "extends: w8a8\nname: common\nhead: {weight: {bits: 4}}\n")
    mine = write(configs, "mine.yaml", "extends: base/common.yaml\nmlp_fc1: {weight: {bits: 6}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the files are: the old lookup failed here
    config = load_qconfig(mine)
    assert config.spec_for("head", "weight").bits == 4 and config.spec_for("mlp_fc1", "weight").bits == 6
    # a chain: the base's own relative extends is read from the base's directory
    write(configs / "base", "leaf.yaml", "extends: common.yaml\n")
    write(configs, "chain.yaml", "extends: base/leaf.yaml\n")
    assert load_qconfig(configs / "chain.yaml").spec_for("head", "weight").bits == 4


def test_relative_extends_shadowed_in_the_working_directory_is_not_used(tmp_path, monkeypatch):
    """A same-named file in the working directory must not be picked instead."""
    (tmp_path / "a").mkdir()
    write(tmp_path / "a", "base.yaml", "extends: w8a8\nhead: {weight: {bits: 4}}\n")
    write(tmp_path / "a", "mine.yaml", "extends: base.yaml\n")
    write(tmp_path, "base.yaml", "extends: w8a8\nhead: {weight: {bits: 2}}\n")
    monkeypatch.chdir(tmp_path)
    assert load_qconfig(Path("a/mine.yaml")).spec_for("head", "weight").bits == 4


def test_missing_relative_extends_names_where_it_looked(tmp_path):
    message = error_for(tmp_path, "extends: nowhere.yaml\n", "x.yaml")
    assert "extends" in message and "neither a preset" in message
    assert str(tmp_path / "nowhere.yaml") in message


def test_extends_in_a_directory_config_is_relative_to_that_directory(tmp_path, monkeypatch):
    write(tmp_path, "base.yaml", "extends: w8a8\n")
    parts = tmp_path / "parts"
    parts.mkdir()
    write(parts, "attn.yaml", "extends: ../base.yaml\nattn_q_out: {bits: 6, signed: false}\n")
    monkeypatch.chdir(parts.parent.parent)
    config = load_qconfig(parts)
    assert config.spec_for("attn_q_out", ACT).bits == 6
    assert config.spec_for("mlp_fc1", "weight") == load_qconfig("w8a8").spec_for("mlp_fc1", "weight")


def test_extends_preset_by_name_and_absolute_path(tmp_path):
    base = write(tmp_path, "abs_base.yaml", "extends: w8a8\nhead: {weight: {bits: 5}}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    mine = write(sub, "mine.yaml", f"extends: {base}\n")
    assert load_qconfig(mine).spec_for("head", "weight").bits == 5
    write(sub, "w8a8", "not: used")  # a file named like the preset: the preset still wins
    assert load_qconfig(write(sub, "p.yaml", "extends: w8a8\n")).spec_for("head", "weight") == load_qconfig(
        "w8a8"
    ).spec_for("head", "weight")


def test_unmatched_globs_name_the_glob_and_close_matches():
    from fxquant.quant.qconfig_globs import check_globs, unmatched_globs

    paths = ["blocks", "blocks.0", "blocks.0.attn", "blocks.0.attn.qkv", "blocks.1", "blocks.1.mlp.fc1", "head"]
    config = load_qconfig(
        {
            "extends": "w8a8",
            "skip": ["head", "blcoks.*"],
            "overrides": {"blocks.1.*": {"norm1": {"bits": 6}}, "blocks.0.atn.*": {}},
        }
    )
    assert unmatched_globs(config, paths) == [("skip[1]", "blcoks.*"), ("overrides.blocks.0.atn.*", "blocks.0.atn.*")]
    with pytest.raises(QConfigError) as info:
        check_globs(config, paths, "TinyViT")
    message = str(info.value)
    assert message.startswith("<dict>: skip[1]: glob 'blcoks.*' matches no module of TinyViT")
    assert "did you mean 'blocks.*'" in message
    config.skip.remove("blcoks.*")
    with pytest.raises(QConfigError, match=r"overrides\.blocks\.0\.atn\.\*: .*'blocks\.0\.attn\.\*'"):
        check_globs(config, paths)
    with pytest.raises(QConfigError, match="top-level modules: blocks, head"):
        check_globs(load_qconfig({"skip": ["zzzzzz"]}), paths)


def test_overrides_by_glob_change_only_matching_modules(tmp_path):
    config = load_qconfig(
        write(
            tmp_path,
            "ov.yaml",
            """\
        extends: w8a8
        overrides:
          "blocks.1.*":
            mlp_fc2:
              weight: {bits: 4}
            norm1: {observer_type: PercentileObserver}
        """,
        )
    )
    base = load_qconfig("w8a8")
    changed = config.spec_for("mlp_fc2", "weight", "blocks.1.mlp.fc2")
    assert changed == base.spec_for("mlp_fc2", "weight", "blocks.1.mlp.fc2").with_(bits=4)
    assert config.spec_for("norm1", ACT, "blocks.1.norm1").observer == "percentile"
    for module in ("blocks.0.mlp.fc2", "blocks.11.mlp.fc2", "blocks.10.mlp.fc2", ""):
        assert config.spec_for("mlp_fc2", "weight", module) == base.spec_for("mlp_fc2", "weight", module), module
    assert config.spec_for("norm1", ACT, "blocks.0.norm1").observer == "minmax"
    assert config.spec_for("mlp_fc1", "weight", "blocks.1.mlp.fc1") == base.spec_for("mlp_fc1", "weight")


def test_override_can_disable_a_point(tmp_path):
    config = load_qconfig(
        write(
            tmp_path,
            "off.yaml",
            """\
        extends: w8a8
        overrides:
          "blocks.0.*":
            attn_kv_out: {enable: False}
        """,
        )
    )
    assert config.spec_for("attn_kv_out", ACT, "blocks.0.attn") is None
    assert config.spec_for("attn_kv_out", ACT, "blocks.1.attn") is not None


def test_skip_keeps_modules_in_float(tmp_path):
    config = load_qconfig(
        write(
            tmp_path,
            "skip.yaml",
            """\
        extends: w8a8
        skip: [head, "blocks.0.*"]
        """,
        )
    )
    assert config.spec_for("head", "weight", "head") is None
    assert config.spec_for("mlp_fc1", "weight", "blocks.0.mlp.fc1") is None
    assert config.spec_for("attn_qkv", "weight", "blocks.0.attn.qkv_q") is None
    assert config.spec_for("norm1", ACT, "blocks.0.norm1") is None
    assert config.spec_for("mlp_fc1", "weight", "blocks.1.mlp.fc1") is not None
    assert config.spec_for("mlp_fc1", "weight", "blocks.10.mlp.fc1") is not None
    assert config.is_skipped("head") and not config.is_skipped("head_drop")


def test_bad_skip_and_overrides_types(tmp_path):
    assert "skip" in error_for(tmp_path, "skip: head\n", "s.yaml")
    assert "overrides" in error_for(tmp_path, "overrides: [1, 2]\n", "o.yaml")


def test_dict_qconfig_and_passthrough():
    config = load_qconfig({"norm1": {"bits": 8, "signed": False}})
    assert config.source == "<dict>" and config.spec_for("norm1", ACT).qmax == 255
    assert load_qconfig(config) is config
    with pytest.raises(QConfigError, match=r"<dict>: norm1\.bits"):
        load_qconfig({"norm1": {"bits": "8"}})
    with pytest.raises(QConfigError):
        load_qconfig(8)


# ----------------------------------------------------------------------- directories
def test_directory_of_files_merges(tmp_path):
    write(tmp_path, "attn.yaml", SEED_DOCUMENT)
    write(
        tmp_path,
        "mlp.yaml",
        """\
        mlp_fc1:
          weight: {bits: 8, signed: True, calibration_mode: channel_wise, observer_type: MinmaxObserver}
        mlp_gelu: {bits: 8, signed: False, observer_type: MinmaxObserver}
        skip: [head]
        """,
    )
    write(tmp_path, "notes.txt", "not a qconfig")
    config = load_qconfig(tmp_path)
    assert config.name == tmp_path.name
    seed = load_qconfig(write(tmp_path.parent, "seed_only.yaml", SEED_DOCUMENT))
    for key in (("attn_qkv", "weight"), ("attn_qkv", "output")) + tuple((g, ACT) for g in QKV_ACTIVATIONS):
        assert config.spec_for(*key) == seed.spec_for(*key)
    assert config.spec_for("mlp_fc1", "weight").granularity == "channel_wise"
    assert config.spec_for("mlp_gelu", ACT).signed is False
    assert config.is_skipped("head")


def test_directory_group_defined_twice_names_both_files(tmp_path):
    first = write(tmp_path, "a_attn.yaml", SEED_DOCUMENT)
    second = write(tmp_path, "b_more.yaml", "attn_q_out: {bits: 4}\n")
    with pytest.raises(QConfigError) as info:
        load_qconfig(tmp_path)
    message = str(info.value)
    assert str(first) in message and str(second) in message and "attn_q_out" in message


def test_directory_error_names_the_file(tmp_path):
    write(tmp_path, "a.yaml", SEED_DOCUMENT)
    bad = write(tmp_path, "b.yaml", "norm1: {observer_type: FooObserver}\n")
    with pytest.raises(QConfigError) as info:
        load_qconfig(tmp_path)
    assert str(bad) in str(info.value) and "norm1.observer_type" in str(info.value)


def test_empty_directory(tmp_path):
    with pytest.raises(QConfigError, match="no .yaml"):
        load_qconfig(tmp_path)


# --------------------------------------------------------------------------- presets
def test_presets_load():
    names = fxquant.preset_names()
    assert {"w8a8", "seed_attn"} <= set(names)
    for name in names:
        config = load_qconfig(name)
        assert config.name == name and config.description
        assert any(spec is not None for spec in all_specs(config).values())


def test_w8a8_is_what_its_header_says():
    config = load_qconfig("w8a8")
    for group in ("patch_embed", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "head", "patch_merging"):
        spec = config.spec_for(group, "weight")
        assert (spec.bits, spec.signed, spec.symmetric, spec.granularity, spec.observer) == (
            8,
            True,
            True,
            "channel_wise",
            "minmax",
        ), group
        assert config.spec_for(group, "output") is None
    observers = {
        "norm1": "minmax",
        "norm2": "minmax",
        "attn_v_out": "omse",
        "mlp_gelu": "omse",
        "final_norm": "omse",
        "patch_merging_norm": "omse",
    }
    for group, observer in observers.items():
        spec = config.spec_for(group, ACT)
        assert (spec.bits, spec.signed, spec.granularity, spec.observer) == (8, False, "layer_wise", observer), group
    for group, observer in (
        ("attn_q_out", "minmax"),
        ("attn_k_out", "minmax"),
        ("attn_v_input", "minmax"),
        ("attn_kv_out", "omse"),
    ):
        spec = config.spec_for(group, ACT)
        assert (spec.granularity, spec.observer) == ("head_wise", observer), group
    assert config.smooth_alpha == 0.5
    for group in ("intSoft", "residual"):
        assert config.spec_for(group, ACT) is None


def test_seed_attn_equals_the_seed_document(tmp_path):
    preset = load_qconfig("seed_attn")
    seed = load_qconfig(write(tmp_path, "attn_config.yaml", SEED_DOCUMENT))
    for module in ("", "blocks.0.attn.qkv_q", "blocks.3.attn"):
        assert all_specs(preset, module) == all_specs(seed, module), module
    enabled = {key for key, spec in all_specs(preset).items() if spec is not None}
    assert enabled == {("attn_qkv", "weight")} | {(g, ACT) for g in QKV_ACTIVATIONS}  # nothing else
    weight = preset.spec_for("attn_qkv", "weight")
    assert (weight.granularity, weight.observer, weight.signed, weight.bits) == ("channel_wise", "minmax", True, 8)
    assert preset.spec_for("attn_qkv", "output") is None
    for group in QKV_ACTIVATIONS:
        spec = preset.spec_for(group, ACT)
        assert (spec.granularity, spec.observer, spec.signed, spec.bits) == ("layer_wise", "minmax", False, 8)
    assert not preset.skip and not preset.overrides


def test_to_dict_round_trips():
    for name in fxquant.preset_names():
        config = load_qconfig(name)
        again = load_qconfig(config.to_dict())
        assert all_specs(again) == all_specs(config), name


def test_directory_group_the_model_lacks_fails_naming_the_file(tmp_path):
    import timm
    import torch

    import fxquant
    from fxquant.errors import FxqError

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "attention.yaml").write_text("attn_q_out: {bits: 8, signed: false}\n")
    (parts / "merging.yaml").write_text("patch_merging: {weight: {bits: 8}}\n")  # Swin only
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=4
    ).eval()
    with pytest.raises(FxqError) as info:
        fxquant.compile(model, parts, calib_data=torch.randn(2, 3, 32, 32), progress=False)
    message = str(info.value)
    assert "merging.yaml" in message and "patch_merging" in message and "no patch_merging op" in message


def test_directory_unknown_key_names_file_and_key(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "mlp.yaml").write_text("mlp_gelu: {bits: 8, twn_ratio: 0.3}\n")
    with pytest.raises(QConfigError) as info:
        load_qconfig(parts)
    assert "mlp.yaml" in str(info.value) and "mlp_gelu.twn_ratio" in str(info.value)
