"""``--hf-config`` / ``--hf-weights``: a Hugging Face transformers vision model for ``compile`` and ``diff``.

``--hf-config`` is a folder as ``save_pretrained`` writes it (``config.json``, and
``model.safetensors`` whose weights are loaded), a ``config.json`` file (random-init weights,
or ``--hf-weights FILE``), or a hub name such as ``facebook/dinov2-small`` where there is
network. The model class is the config's ``architectures[0]`` (else the family's base model).
Calibration images are resized and normalized as the folder's ``preprocessor_config.json``
says (ImageNet mean and std, the config's image size, without one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fxquant.cli.checkpoint import load_checkpoint
from fxquant.cli.inputs import CliError
from fxquant.ir.hf_trace import families_text

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CliError(
            '--hf-config needs the transformers package: pip install "fxquant[hf]" (or pip install transformers)'
        ) from None
    return transformers


def _config(transformers, source: str):
    path = Path(source)
    try:
        if path.is_file():
            model_type = json.loads(path.read_text()).get("model_type")
            return type(transformers.AutoConfig.for_model(model_type)).from_json_file(str(path))
        return transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:  # missing model_type, no network for a hub name, bad JSON
        where = "a config.json file, a save_pretrained folder or a hub name (with network)"
        raise CliError(f"--hf-config {source}: could not read a transformers config ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]}); expected {where}") from None  # fmt: skip


def _model_class(transformers, config):
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except Exception:
        raise CliError(
            f"--hf-config: no transformers model class for config {type(config).__name__} "
            f"(architectures={names}); fxquant supports {families_text()}"
        ) from None


def build_hf_model(source: str, weights: Optional[str], seed: int) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, its class name) from ``--hf-config`` and ``--hf-weights``."""
    transformers = _transformers()
    config = _config(transformers, source)
    cls = _model_class(transformers, config)
    folder = Path(source)
    torch.manual_seed(seed)
    saved = folder.is_dir() and any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir())
    if weights is None and (saved or not folder.exists()):
        try:  # a save_pretrained folder or a hub name: transformers reads (and renames) the weights itself
            model = cls.from_pretrained(source, config=config)
        except Exception as exc:
            raise CliError(f"--hf-config {source}: could not load the weights ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from None  # fmt: skip
        return model.eval(), cls.__name__
    model = cls(config)
    if weights is not None:
        try:
            load_checkpoint(model, weights, cls.__name__)
        except CliError as exc:
            hint = (
                "; a file from another transformers version names its keys differently: give the "
                "save_pretrained folder as --hf-config instead (transformers renames its keys when loading)"
            )
            raise CliError(str(exc).replace("--checkpoint", "--hf-weights") + hint) from None
    return model.eval(), cls.__name__


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def hf_data_config(model: torch.nn.Module, source: str) -> dict:
    """timm's ``create_transform`` settings for this model's calibration images: the folder's
    ``preprocessor_config.json`` (its crop or resize size, mean, std), else the config's
    image size and ImageNet mean and std."""
    config = model.config
    height, width = _pair(getattr(config, "image_size", 224))
    processor = Path(source) / "preprocessor_config.json"
    settings = json.loads(processor.read_text()) if processor.is_file() else {}
    crop_pct = 1.0
    crop, size = settings.get("crop_size"), settings.get("size")
    if settings.get("do_center_crop") and isinstance(crop, dict) and "height" in crop:
        height, width = int(crop["height"]), int(crop["width"])
        if isinstance(size, dict) and "shortest_edge" in size:
            crop_pct = min(height, width) / int(size["shortest_edge"])
    elif isinstance(size, dict) and "height" in size:
        height, width = int(size["height"]), int(size["width"])
    return {
        "input_size": (getattr(config, "num_channels", 3), height, width),
        "mean": tuple(settings.get("image_mean", IMAGENET_MEAN)),
        "std": tuple(settings.get("image_std", IMAGENET_STD)),
        "interpolation": "bicubic" if settings.get("resample") == 3 else "bilinear",
        "crop_pct": crop_pct,
    }
