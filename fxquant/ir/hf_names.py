"""Hugging Face ``transformers`` module names -> fxquant's quantization groups.

The ``annotate`` pass finds groups by module path; these rules give a transformers ViT,
DeiT, DINOv2 or Swin the same groups as its timm twin, so a preset means the same on
both. Both naming schemes are covered: transformers 5 (``attention.q_proj``,
``attention.o_proj``, ``mlp.fc1``) and transformers 4 (``attention.attention.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``; Swin's
``attention.self.query/key/value``).

| timm (group) | transformers 5 | transformers 4 |
|---|---|---|
| `qkv` split into Q/K/V (`attn_qkv`) | `attention.q_proj/k_proj/v_proj` | `attention.attention.query/key/value` |
| `attn.proj` (`attn_proj`) | `attention.o_proj` | `attention.output.dense` |
| `mlp.fc1` / `mlp.fc2` (`mlp_fc1`, `mlp_fc2`) | `mlp.fc1` / `mlp.fc2` | `intermediate.dense` / `output.dense` |
| `norm1` / `norm2` | `layernorm_before` / `layernorm_after` (DINOv2 `norm1` / `norm2`) | the same |
| `norm` (`final_norm`) | `layernorm` | `layernorm` |
| `patch_embed.proj` (`patch_embed`) | `embeddings.patch_embeddings.projection` | the same |
| `head`, `head_dist` (`head`) | `classifier`, `cls_classifier`, `distillation_classifier`, `pooler.dense` | the same |
| `ls1` / `ls2` (float) | `layer_scale1` / `layer_scale2` (float) | the same |

Swin's ``relative_position_bias_table`` and shifted-window masks are added to the scores
between q@kT (``attn_kv_out``) and softmax and stay float, as timm's do; its
``downsample.reduction`` / ``downsample.norm`` already carry timm's names.
"""

from __future__ import annotations

import re

_BLOCK = r"(^|\.)(layer|layers|blocks)\.\d+"

HF_LINEAR_RULES = [
    (re.compile(r"(^|\.)attention\.(q_proj|k_proj|v_proj)$"), "attn_qkv"),
    (re.compile(r"(^|\.)attention\.(attention|self)\.(query|key|value)$"), "attn_qkv"),
    (re.compile(r"(^|\.)attention\.o_proj$"), "attn_proj"),
    (re.compile(r"(^|\.)attention\.output\.dense$"), "attn_proj"),
    (re.compile(r"(^|\.)intermediate\.dense$"), "mlp_fc1"),
    (re.compile(_BLOCK + r"\.output\.dense$"), "mlp_fc2"),
    (re.compile(r"(^|\.)embeddings\.patch_embeddings\.projection$"), "patch_embed"),
    (re.compile(r"^(classifier|cls_classifier|distillation_classifier)$|(^|\.)pooler\.dense$"), "head"),
]
HF_NORM_RULES = [
    (re.compile(r"(^|\.)layernorm_before$"), "norm1"),
    (re.compile(r"(^|\.)layernorm_after$"), "norm2"),
    (re.compile(r"^(\w+\.)?layernorm$"), "final_norm"),
]
# gm.meta key hf_trace sets on a transformers graph: the model's family ("ViT", ...), None when unlisted
HF_FAMILY_META = "fxq.hf_family"
# a transformer block: its residual adds are the `residual` group
HF_BLOCK_PATH = re.compile(_BLOCK + "$")
_SEPARATE_QKV = re.compile(r"(^|\.)attention\.((q|k|v)_proj|(attention|self)\.(query|key|value))$")


def is_separate_qkv(path: str) -> bool:
    """True for a Q, K or V Linear of its own (transformers), rather than timm's fused qkv."""
    return bool(_SEPARATE_QKV.search(path))
