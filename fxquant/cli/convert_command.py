"""``fxquant convert-config OLD -o new.yaml``: a predecessor config as an fxquant qconfig.

OLD is a file or a folder in one of the formats of ``BicMak/Quant_trainning``
(:mod:`fxquant.quant.legacy_formats`). The written file is fxquant's schema with a comment for
every key of OLD; before reporting success the command loads both and checks they give the same
QConfig.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fxquant.cli.inputs import CliError, check_output_file, writing
from fxquant.quant.legacy_formats import LegacyConfigWarning
from fxquant.quant.legacy_writer import render
from fxquant.quant.qconfig import load_qconfig, predecessor_conversion

__all__ = ["add_convert_parser", "run_convert"]


def add_convert_parser(sub) -> None:
    conv = sub.add_parser(
        "convert-config",
        help="write a predecessor (Quant_trainning) config file or folder as one fxquant qconfig YAML",
    )
    conv.add_argument("old", help="a predecessor config: a YAML file, or a folder of them")
    conv.add_argument("-o", "--output", required=True, help="the fxquant qconfig YAML to write")


def run_convert(args) -> int:
    old = Path(args.old)
    if not old.exists():
        raise CliError(f"{args.old}: no such file or directory")
    check_output_file(args.output, "-o", "qconfig.yaml")
    conversion = predecessor_conversion(old)
    if conversion is None:
        raise CliError(
            f"{args.old}: not in one of the predecessor's formats: it already is an fxquant qconfig "
            "(fxquant.load_qconfig reads it as it is)"
        )
    with writing("-o", args.output):
        Path(args.output).write_text(render(conversion), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyConfigWarning)
        same = load_qconfig(args.output) == load_qconfig(old)
    if not same:  # the writer and the reader disagree: a bug, never a silent difference
        raise CliError(f"{args.output}: does not load as the same qconfig as {args.old}; please report this")
    differs = sorted({(n.file, n.key) for n in conversion.notes if n.differs})
    groups = [key for key in conversion.data if key not in ("name", "description")]
    print(f"{args.old} -> {args.output}: {len(groups)} groups ({', '.join(groups)})")
    if differs:
        print(f"{len(differs)} keys mean something else in fxquant: see the comments marked [differs]")
    return 0
