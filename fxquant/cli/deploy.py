"""``fxquant export`` and ``fxquant run``: use a model saved by ``fxquant compile --save``.

The file is read with :func:`fxquant.load` (no pickle). Its input size comes from the
graph itself (timm's patch embedding checks the image height and width against
constants, which tracing keeps) unless ``--img-size`` says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import operator
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx

import fxquant
from fxquant.cli.inputs import check_output_file, image_files, positive_int, read_images, report_skipped
from fxquant.errors import FxqError
from fxquant.io.onnx_export import export_onnx, qdq_summary

TOP_K = 5


class DeployError(FxqError):
    """Bad input to export/run: printed as one line, exit status 2."""


def add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a saved quantized model (.fxq) as QDQ ONNX")
    export.add_argument("model_file", help="a file written by fxquant compile --save / fxquant.save")
    export.add_argument("--onnx", required=True, help="the ONNX file to write")
    export.add_argument("--img-size", type=positive_int, help="input height and width (default: read from the graph)")
    export.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (>= 13; default 17)")


def add_run_parser(sub) -> None:
    run = sub.add_parser("run", help="classify a folder of images with a saved quantized model (.fxq)")
    run.add_argument("model_file", help="a file written by fxquant compile --save / fxquant.save")
    run.add_argument("--images", required=True, help="a directory of images (.jpg, .png, ...)")
    run.add_argument("--img-size", type=positive_int, help="input height and width (default: read from the graph)")
    run.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default 16)")
    run.add_argument(
        "--model",
        help="timm model name whose eval preprocessing (resize, crop, mean/std) to use "
        "(default: the name saved in the file by compile)",
    )


def load_graph(path: str) -> fx.GraphModule:
    if Path(path).is_dir():
        raise DeployError(f"{path}: is a directory; give a file written by fxquant compile ... --save FILE")
    if not Path(path).is_file():
        raise DeployError(f"{path}: no such file (write one with fxquant compile ... --save FILE)")
    return fxquant.load(path)


def graph_input_size(gm: fx.GraphModule) -> Optional[tuple[int, int]]:
    """(H, W) from the graph's ``x.shape[2] == H`` / ``x.shape[3] == W`` checks, if it has them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return None
    image = placeholders[0]
    found: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not operator.eq or len(node.args) != 2:
            continue
        item, value = node.args
        if not (isinstance(value, int) and isinstance(item, fx.Node) and item.target is operator.getitem):
            continue
        shape, index = item.args
        if (
            isinstance(shape, fx.Node)
            and shape.target is getattr
            and shape.args == (image, "shape")
            and index in (2, 3)
        ):
            found[index] = value
    return (found[2], found[3]) if len(found) == 2 else None


def _input_channels(gm: fx.GraphModule) -> int:
    for module in gm.modules():
        codes = getattr(module, "weight_codes", None)
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
        if codes is not None and codes.dim() == 4:
            return codes.shape[1] * getattr(module, "groups", 1)
    return 3


def input_shape(gm: fx.GraphModule, img_size: Optional[int], path: str) -> tuple[int, int, int]:
    """(C, H, W): --img-size if given, else the size the graph checks; refused when they differ."""
    graph_size = graph_input_size(gm)
    if img_size and graph_size and graph_size != (img_size, img_size):
        height, width = graph_size
        fix = f"pass --img-size {height} or leave it out" if height == width else "leave --img-size out"
        raise DeployError(
            f"--img-size {img_size}: {path} takes {height}x{width} images (its graph checks the "
            f"input size), not {img_size}x{img_size}; {fix}"
        )
    size = (img_size, img_size) if img_size else graph_size
    if size is None:
        raise DeployError(f"{path}: the graph does not say its input size; pass --img-size")
    return (_input_channels(gm), *size)


def run_export(args: argparse.Namespace) -> int:
    check_output_file(args.onnx, "--onnx", "model.onnx")
    gm = load_graph(args.model_file)
    shape = input_shape(gm, args.img_size, args.model_file)
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    path = export_onnx(gm, args.onnx, example, opset=args.opset)
    ops = qdq_summary(path)
    print(
        f"ONNX written to {path} (input 'images' of shape (batch, {', '.join(map(str, shape))}), opset "
        f"{args.opset}): {ops.get('QuantizeLinear', 0)} QuantizeLinear, {ops.get('DequantizeLinear', 0)} "
        f"DequantizeLinear, {sum(ops.values())} nodes"
    )
    return 0


def _model_name(gm: fx.GraphModule, given: Optional[str], path: str) -> str:
    """The timm model whose preprocessing ``run`` uses: --model, else the name compile saved."""
    import timm

    if given:
        if not timm.is_model(given):
            raise DeployError(
                f"--model {given}: unknown timm model; give the name the file was compiled from, "
                "e.g. --model vit_base_patch16_224"
            )
        return given
    saved = getattr(getattr(gm, "report", None), "model", "") or ""
    if not timm.is_model(saved):
        named = f"names '{saved}', not a timm model" if saved else "names no model"
        raise DeployError(
            f"{path}: the file {named}, and run needs the model's preprocessing (resize, crop, "
            "mean/std): pass --model NAME (the timm name it was compiled from, e.g. --model "
            "vit_base_patch16_224), or save it with fxquant.compile(..., model_name=NAME)"
        )
    return saved


def _transform(model_name: str, shape: tuple[int, int, int]):
    """timm's eval transform for the model the file was compiled from, at the graph's input size."""
    import timm.data

    pretrained = timm.models.get_pretrained_cfg(model_name)
    # a model without a pretrained config gets timm's defaults (ImageNet mean/std, bicubic resize)
    config = dict(
        timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict() if pretrained else {"input_size": shape})
    )
    config["input_size"] = shape
    return timm.data.create_transform(**config)


def has_classifier_head(gm: fx.GraphModule, width: int) -> bool:
    """A Linear named ``head`` (``head.fc`` in Swin) producing ``width`` outputs (timm's classifier;
    ``num_classes=0`` makes it an Identity and the output is the pooled features)."""
    for name, module in gm.named_modules():
        if "head" in name.split(".") and getattr(module, "out_features", None) == width:
            return True
    return False


@functools.lru_cache(maxsize=1)
def class_names(num_classes: int) -> Optional[list[str]]:
    """ImageNet-1k descriptions for a 1000-way head (timm's bundled ImageNetInfo), else None."""
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


def _forward(gm: fx.GraphModule, batch: torch.Tensor, path: str) -> torch.Tensor:
    """``gm(batch)``; a model that refuses the input (a size its graph does not check, say) is one line."""
    try:
        return gm(batch)
    except (RuntimeError, AssertionError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise DeployError(
            f"{path}: the model failed on images of shape {tuple(batch.shape[1:])} "
            f"({type(exc).__name__}: {detail[:160]}); pass the --img-size it was compiled for"
        ) from None


def _print_predictions(gm: fx.GraphModule, files: list[Path], out: torch.Tensor) -> None:
    if out.dim() != 2 or not has_classifier_head(gm, out.shape[1]):
        for f, row in zip(files, out):
            print(
                f"{f.name}: features of shape {tuple(row.shape)}, L2 norm {float(row.float().norm()):.4g} "
                "(no classifier head)"
            )
        return
    names = class_names(out.shape[1])
    probs = out.float().softmax(-1)
    top = probs.topk(min(TOP_K, probs.shape[1]), dim=-1)
    for f, p, idx in zip(files, top.values, top.indices):
        labels = [f"{names[i] if names else f'class {i}'} ({100 * float(v):.1f}%)" for v, i in zip(p, idx.tolist())]
        print(f"{f.name}: " + "; ".join(labels))


@torch.no_grad()
def run_images(args: argparse.Namespace) -> int:
    """Top-5 classes (or the feature norm) per image; unreadable image files are skipped with a warning."""
    gm = load_graph(args.model_file)
    shape = input_shape(gm, args.img_size, args.model_file)
    files = image_files(args.images, "--images")
    transform = _transform(_model_name(gm, args.model, args.model_file), shape)
    skipped = []
    for start in range(0, len(files), args.batch_size):
        read, images, unreadable = read_images(files[start : start + args.batch_size], transform)
        skipped += unreadable
        if read:
            _print_predictions(gm, read, _forward(gm, torch.stack(images), args.model_file))
    report_skipped("--images", args.images, skipped, len(files))
    return 0
