"""What each of the predecessor's names quantized, as fxquant points (group or group.section).

Read from its model code (``models/quant_attn.py``, ``quant_mlp.py``, ``quant_vit_block.py``,
``quant_embedding.py``, ``quant_vit.py``, and the older ``models/vit_block.py``):

* per-part files: the names are fxquant's groups, plus ``residual1`` (the sum after
  attention) and ``residual2`` (the sum after the MLP), fxquant's groups of the same names;
* the global file: ``weight``/``outputs`` for every Linear of the part the file name says,
  ``activation`` (else ``outputs``) for its other points; the embedding read ``activation``
  only, for the sum of patches, class token and position embedding;
* the single and split files: ``layers.attn_qkv`` quantized the qkv weight *and* its output,
  which ``attn_layer.attn_qkv_output`` then quantized again (likewise ``attn_proj`` and
  ``sv_attn``, ``mlp_fc2`` and ``mlp_act2``); ``kv_act`` the scores, ``mlp_act`` the GELU's
  output, ``intSoft`` the softmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from fxquant.quant.legacy_mapping import ACTIVATION, EMBED, NORM, OUTPUT, SCORES, SOFTMAX, TOKENS, WEIGHT

__all__ = [
    "PER_PART_GROUPS",
    "GLOBAL_KEYS",
    "SECTIONED_KEYS",
    "OLD_NAMES",
    "global_targets",
    "allowed_names",
    "split_order",
]

PER_PART_GROUPS = {
    **{name: WEIGHT for name in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "head")},  # weight + output
    **{name: TOKENS for name in ("attn_q_out", "attn_k_out", "attn_v_input", "attn_v_out")},
    "attn_kv_out": SCORES,
    "intSoft": SOFTMAX,
    "mlp_gelu": ACTIVATION,
    "residual1": ACTIVATION,
    "residual2": ACTIVATION,
    "norm1": NORM,
    "norm2": NORM,
    "final_norm": NORM,
}

GLOBAL_KEYS = ("outputs", "weight", "activation", "norm", "intsoft")
SECTIONED_KEYS = ("default", "layers", "attn_layer", "residual_layer")

EMBED_NOTE = (
    "the predecessor quantized the embedding after the class token and position embedding were "
    "added; fxquant's nearest point is the patch projection's output, before them: patch_embed.output"
)


def global_targets(stem: str, data: Mapping[str, Any]) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(the part that read a global file named ``stem``, [(key, target, role, note)])."""
    act = "activation" if data.get("activation") else "outputs"
    if "attn" in stem:
        linears, acts = (
            ("attn_qkv", "attn_proj"),
            [
                ("attn_q_out", TOKENS),
                ("attn_k_out", TOKENS),
                ("attn_v_input", TOKENS),
                ("attn_kv_out", SCORES),
                ("attn_v_out", TOKENS),
                ("intSoft", SOFTMAX),
            ],
        )
        part = "attention"
    elif "mlp" in stem:
        linears, acts, part = ("mlp_fc1", "mlp_fc2"), [("mlp_gelu", ACTIVATION)], "MLP"
    else:
        return "embedding", [(act, "patch_embed.output", EMBED, EMBED_NOTE)]
    targets = [
        (key, f"{name}.{key.rstrip('s')}", WEIGHT if key == "weight" else OUTPUT, "")
        for name in linears
        for key in ("weight", "outputs")
    ]
    return part, targets + [(act, group, role, "") for group, role in acts]


# name -> (its section, [(target, role, what the predecessor applied it to)], the note when
# fxquant quantizes once what the predecessor quantized twice)
_TWICE = (
    "the predecessor's QuantLinear also quantized {module}'s output with this setting, right before "
    "{then} quantized it again; fxquant quantizes that tensor once, as {target}, with {then}'s setting"
)
OLD_NAMES: dict[str, tuple[str, list[tuple[str, str, str]], Optional[str]]] = {
    "attn_qkv": (
        "layers",
        [("attn_qkv.weight", WEIGHT, "the qkv weight")],
        _TWICE.format(module="attn.qkv", then="attn_qkv_output", target="attn_qkv.output"),
    ),
    "attn_proj": (
        "layers",
        [("attn_proj.weight", WEIGHT, "the proj weight")],
        _TWICE.format(module="attn.proj", then="sv_attn", target="attn_proj.output"),
    ),
    "mlp_fc1": (
        "layers",
        [("mlp_fc1.weight", WEIGHT, "the fc1 weight"), ("mlp_fc1.output", OUTPUT, "its output")],
        None,
    ),
    "mlp_fc2": (
        "layers",
        [("mlp_fc2.weight", WEIGHT, "the fc2 weight")],
        _TWICE.format(module="mlp.fc2", then="mlp_act2", target="mlp_fc2.output"),
    ),
    "norm1": ("layers", [("norm1", NORM, "the LayerNorm's output")], None),
    "norm2": ("layers", [("norm2", NORM, "the LayerNorm's output")], None),
    "attn_qkv_output": ("attn_layer", [("attn_qkv.output", ACTIVATION, "the qkv Linear's output")], None),
    "kv_act": ("attn_layer", [("attn_kv_out", SCORES, "the scores q @ k^T * scale")], None),
    "sv_attn": ("attn_layer", [("attn_proj.output", ACTIVATION, "attn.proj's output, despite the name")], None),
    "mlp_act": ("attn_layer", [("mlp_gelu", ACTIVATION, "the GELU's output")], None),
    "mlp_act2": ("attn_layer", [("mlp_fc2.output", ACTIVATION, "fc2's output")], None),
    "intSoft": ("attn_layer", [("intSoft", SOFTMAX, "the softmax probabilities")], None),
    "residual1": ("residual_layer", [("residual1", ACTIVATION, "the sum after attention")], None),
    "residual2": ("residual_layer", [("residual2", ACTIVATION, "the sum after the MLP")], None),
}


def allowed_names() -> str:
    """The predecessor's block names by the section that held them, for error messages."""
    by_section: dict[str, list[str]] = {}
    for name, (section, _targets, _twice) in OLD_NAMES.items():
        by_section.setdefault(section, []).append(name)
    return "; ".join(f"{section}: {', '.join(names)}" for section, names in by_section.items())


SPLIT_FILES = ("weight_config", "activation_config", "residual_config")


def split_order(files: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """The predecessor read weight, activation, residual in this order (the first file's default
    fills names no file gives); other files follow by name."""
    rank = {stem: i for i, stem in enumerate(SPLIT_FILES)}
    return sorted(files, key=lambda item: (rank.get(Path(item[0]).stem, len(rank)), str(item[0])))
