"""Command line: ``fxquant compile --model NAME --qconfig w8a8 --calib random:32 ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import fxquant
from fxquant.cli.checkpoint import load_checkpoint
from fxquant.cli.convert_command import add_convert_parser, run_convert
from fxquant.cli.deploy import add_export_parser, add_run_parser, run_export, run_images
from fxquant.cli.hf_model import build_hf_model, hf_data_config
from fxquant.cli.inputs import (
    IMAGE_SUFFIXES,
    ArgumentParser,
    CliError,
    check_output_dir,
    check_output_file,
    image_files,
    non_negative_int,
    positive_int,
    read_images,
    report_skipped,
    writing,
)
from fxquant.cli.report_command import add_report_parser, run_report, stats_stem, write_debug_page
from fxquant.debug import diff
from fxquant.errors import FxqError
from fxquant.quant import distributed

__all__ = ["IMAGE_SUFFIXES", "CliError", "build_model", "calibration_batches", "load_checkpoint", "main"]


def build_model(name: str, checkpoint: Optional[str], pretrained: bool, kwargs: dict) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        raise CliError(
            f"unknown timm model '{name}'; list them with python -c \"import timm; print(timm.list_models('*vit*'))\""
        )
    if pretrained and checkpoint:
        raise CliError("give either --pretrained or --checkpoint, not both")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # hub errors, bad kwargs
        hint = " (no network? download the weights elsewhere and pass --checkpoint PATH)" if pretrained else ""
        raise CliError(f"could not create model '{name}' with {kwargs}: {type(exc).__name__}: {exc}{hint}") from exc
    if checkpoint:
        load_checkpoint(model, checkpoint, name)
    return model.eval()


def calibration_batches(
    spec: str, model: torch.nn.Module, batch_size: int, data_config: Optional[dict] = None
) -> list[torch.Tensor]:
    """``random:N`` (seeded randn images) or a directory of images (timm's eval transform,
    with ``data_config`` when given, else the model's timm data config); unreadable image
    files are skipped with a warning."""
    import timm.data

    config = dict(data_config or timm.data.resolve_data_config({}, model=model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the model's own size wins over its pretrained config's
        config["input_size"] = (config["input_size"][0], *img_size)
    if spec.startswith("random:"):
        return list(torch.split(_random_images(spec, config["input_size"]), batch_size))
    if not Path(spec).is_dir():
        raise CliError(f"--calib {spec}: expected random:N or a directory of images")
    files = image_files(spec, "--calib")
    _, images, skipped = read_images(files, timm.data.create_transform(**config))
    report_skipped("--calib", spec, skipped, len(files))
    return list(torch.split(torch.stack(images), batch_size))


def _random_images(spec: str, image_shape: tuple) -> torch.Tensor:
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        raise CliError(f"--calib {spec}: expected random:N with an integer N") from None
    if count < 1:
        raise CliError("--calib random:N needs N >= 1")
    try:
        return torch.randn((count, *image_shape), generator=torch.Generator().manual_seed(0))
    except RuntimeError:  # the allocator: N images do not fit in memory
        raise CliError(
            f"--calib {spec}: not enough memory for {count} images of shape {tuple(image_shape)}; use a smaller N"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fxquant", description="Post-training quantization of ViTs with torch.fx")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="quantize a timm or transformers model; QSNR after every pass")
    _add_model_arguments(comp)
    comp.add_argument("--dump-dir", help="write NN_<pass>.py/.dot/.json after every pass here")
    comp.add_argument("--report", help="write the JSON report here")
    comp.add_argument(
        "--html",
        help="write a self-contained HTML page here (pass table, QSNR plot, worst "
        "points with histograms, graph) and its layer statistics as <name>_stats.csv/.json",
    )
    comp.add_argument(
        "--no-diff",
        action="store_true",
        help="skip the per-pass numeric diff against FP32 (faster; the report has no QSNR)",
    )
    comp.add_argument(
        "--numeric-diff",
        choices=("all", "final"),
        default="all",
        help="'all' (default): the numeric diff against FP32 after every pass; 'final': after the last pass only",
    )
    comp.add_argument("--fast", action="store_true", help="same as --numeric-diff final")
    comp.add_argument("--save", help="save the quantized model here (safetensors, loads without pickle)")
    comp.add_argument("--worst", type=non_negative_int, default=10, help="how many worst points to print (default 10)")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    # a negative K is refused by fxquant.compile itself ("keep_float must be an integer >= 0")
    comp.add_argument(
        "--keep-float",
        type=int,
        default=0,
        metavar="K",
        help="leave the K most sensitive quantization points in float (default 0)",
    )
    comp.add_argument(
        "--backend",
        choices=("fake", "int"),
        default="fake",
        help="fake: a fake-quant graph (default); int: int8 codes, integer GEMMs and dyadic "
        "requantization (the report's notes give its agreement with the fake-quant graph)",
    )
    comp.add_argument(
        "--int-kernels",
        choices=("auto", "portable", "onednn"),
        default="auto",
        help="with --backend int: auto (default: onednn on an x86 CPU with oneDNN's int8 kernels, "
        "portable elsewhere; the report's notes say which and why), portable (torch._int_mm + dyadic "
        "requantization) or onednn (x86: oneDNN's int8 Linear with scales, GELU and requantization in "
        "its epilogue, and the fused attention kernel)",
    )
    _add_diff_parser(sub)
    add_export_parser(sub)
    add_run_parser(sub)
    add_report_parser(sub)
    add_convert_parser(sub)
    return parser


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    """What both subcommands need: the model, its weights, the qconfig and the calibration data."""
    model = command.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224 (or --hf-config)")
    model.add_argument(
        "--hf-config",
        help="a Hugging Face transformers model instead of --model: a save_pretrained folder (its weights are "
        "loaded), a config.json (random init) or a hub name (needs network)",
    )
    command.add_argument("--hf-weights", help="with --hf-config: a .safetensors (or .pth) state dict to load")
    source = command.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="state dict (.pth/.pt) or .safetensors file to load")
    source.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    command.add_argument("--qconfig", default="w8a8", help="preset name, YAML file or directory (default w8a8)")
    command.add_argument("--calib", default="random:32", help="random:N or a directory of images (default random:32)")
    command.add_argument("--batch-size", type=positive_int, default=8, help="calibration batch size (default 8)")
    command.add_argument("--img-size", type=positive_int, help="model input size (timm img_size)")
    command.add_argument(
        "--num-classes", type=non_negative_int, help="classifier classes (timm num_classes; 0 = features)"
    )
    command.add_argument("--seed", type=int, default=0, help="torch seed for random-init weights (default 0)")


def _add_diff_parser(sub) -> None:
    diff = sub.add_parser("diff", help="isolated vs propagated QSNR per quantization point, worst first")
    _add_model_arguments(diff)
    diff.add_argument(
        "--top", type=non_negative_int, default=20, help="how many points to print, worst first (default 20)"
    )
    diff.add_argument("--json", help="write all points as JSON here")


def _model_and_calibration(args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    if args.hf_weights and not args.hf_config:
        raise CliError("--hf-weights needs --hf-config (the model's config.json or save_pretrained folder)")
    if args.hf_config:
        given = {"--checkpoint": args.checkpoint, "--pretrained": args.pretrained, "--img-size": args.img_size}
        timm_only = [option for option, value in {**given, "--num-classes": args.num_classes}.items() if value]
        if timm_only:
            raise CliError(f"{', '.join(timm_only)}: timm options; with --hf-config the config sets them")
        model, args.model = build_hf_model(args.hf_config, args.hf_weights, args.seed)
        return model, calibration_batches(args.calib, model, args.batch_size, hf_data_config(model, args.hf_config))
    kwargs = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint, args.pretrained, kwargs)
    return model, calibration_batches(args.calib, model, args.batch_size)


def run_diff(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json", "diff.json")
    model, calib = _model_and_calibration(args)
    result = diff(model, args.qconfig, calib_data=calib, model_name=args.model)
    print(result.table(top=args.top))
    if args.json:
        with writing("--json", args.json):
            print(f"diff written to {result.to_json(args.json)}")
    return 0


def _check_compile_outputs(args: argparse.Namespace) -> None:
    """Before the compile: every path it will write must be writable as a file (a folder for --dump-dir)."""
    check_output_file(args.save, "--save", "model.fxq")
    check_output_file(args.report, "--report", "report.json")
    check_output_dir(args.dump_dir, "--dump-dir")
    check_output_file(args.html, "--html", "report.html")
    if args.html:
        stem = stats_stem(Path(args.html))
        for stats in (stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")):
            if stats.is_dir():
                raise CliError(
                    f"--html {args.html}: its layer statistics go to {stats}, which is a directory; "
                    "choose another name for the page"
                )


def run_compile(args: argparse.Namespace) -> int:
    _check_compile_outputs(args)
    model, calib = _model_and_calibration(args)
    main_process = True
    if distributed.init_from_env():  # under torchrun: each rank calibrates its shard; rank 0 prints and writes
        calib = distributed.shard_batches(calib)
        main_process = distributed.is_main_process()
    qm = fxquant.compile(
        model,
        args.qconfig,
        calib_data=calib,
        dump_dir=args.dump_dir if main_process else None,
        progress=not args.quiet and main_process,
        model_name=args.model,
        keep_float=args.keep_float,
        numeric_diff=False if args.no_diff else ("final" if args.fast else args.numeric_diff),
        backend=args.backend,
        int_kernels=args.int_kernels,
    )
    if not main_process:
        return 0
    _print_compile_result(qm, args)
    _write_compile_outputs(qm, calib, args)
    return 0


def _print_compile_result(qm, args: argparse.Namespace) -> None:
    print(qm.report.table(worst=args.worst))
    if args.backend == "int":
        for note in qm.report.notes:
            if note.startswith(
                (
                    "int_kernels",
                    "integer vs fake-quant",
                    "output QSNR",
                    "lower_integer",
                    "use_onednn_kernels",
                    "fuse_int_attention",
                    "fuse_residual_adds",
                    "pack_int4_weights",
                    "weight bytes",
                )
            ):
                print(note)
    if args.keep_float:
        print(f"points kept in float (--keep-float {args.keep_float}): {len(qm.keep_float)}")
        for line in qm.report.float_points:
            if "keep_float" in line:
                print(f"  {line}")
        for note in qm.report.notes:
            if note.startswith("keep_float"):
                print(f"  {note}")


def _write_compile_outputs(qm, calib: list[torch.Tensor], args: argparse.Namespace) -> None:
    if args.report:
        with writing("--report", args.report):
            print(f"report written to {qm.report.to_json(args.report)}")
    if args.dump_dir:
        print(f"graph dumps written to {args.dump_dir}")
    if args.html:
        with writing("--html", args.html):
            print(f"HTML report written to {write_debug_page(qm, calib[0], args.html, args.dump_dir)}")
    if args.save:
        with writing("--save", args.save):
            print(f"quantized model saved to {fxquant.save(qm, args.save)} (load it with fxquant.load)")


COMMANDS = {
    "compile": run_compile,
    "diff": run_diff,
    "export": run_export,
    "run": run_images,
    "report": run_report,
    "convert-config": run_convert,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; bad input (an FxqError, argparse's errors included) is one line on stderr, exit 2."""
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except FxqError as exc:
        print(f"fxquant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
