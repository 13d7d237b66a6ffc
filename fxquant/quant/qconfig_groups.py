"""The qconfig's vocabulary of groups and sections: which names a qconfig may use at the top level.

A linear group (``attn_qkv``...) has ``weight:`` and ``output:`` sections; an activation group
(``norm1``...) is a spec itself, stored under the section ``ACT``; a LayerNorm group may also
quantize its input (section ``NORM_INPUT``, for PTF). ``passes/annotate.py`` maps the model's
modules to these names. ``residual`` covers both residual adds of a block; ``residual1`` (the
add after attention) and ``residual2`` (the add after the MLP) set one of them apart.
"""

from __future__ import annotations

from fxquant.quant.recovery_config import RECOVERY_KEYS

__all__ = [
    "LINEAR_GROUPS",
    "ACTIVATION_GROUPS",
    "ALL_GROUPS",
    "NORM_GROUPS",
    "NORM_INPUT",
    "LINEAR_SECTIONS",
    "ACT",
    "TOP_LEVEL_KEYS",
    "RESIDUAL_GROUPS",
]

# ``linear``: every Linear/Conv2d no other group's name rule places (conv+BN attention
# projections, hybrid stems, position-bias MLPs); weights only unless a preset says more
LINEAR_GROUPS = ("patch_embed", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "head", "patch_merging", "linear")
ACTIVATION_GROUPS = (
    "norm1",
    "norm2",
    "attn_q_out",
    "attn_k_out",
    "attn_v_input",
    "attn_kv_out",
    "intSoft",
    "attn_v_out",
    "mlp_gelu",
    "residual",
    "residual1",
    "residual2",
    "final_norm",
    "patch_merging_norm",
)
ALL_GROUPS = LINEAR_GROUPS + ACTIVATION_GROUPS
NORM_GROUPS = ("norm1", "norm2", "final_norm", "patch_merging_norm")  # may also quantize their input
NORM_INPUT = "input"  # the section of a norm group that quantizes the norm's input (PTF)
LINEAR_SECTIONS = ("weight", "output")
ACT = "act"  # the section name under which an activation group's spec is stored
RESIDUAL_GROUPS = ("residual1", "residual2")  # the first and second residual add of a block, in graph order
TOP_LEVEL_KEYS = ("name", "description", "extends", "overrides", "skip", "smooth_alpha") + RECOVERY_KEYS
