"""``--checkpoint FILE``: a state dict read without running code from the file, checked
against the model before it is loaded.

``.safetensors`` files are read with safetensors; anything else with
``torch.load(weights_only=True)``, which refuses a pickle that needs code (a class, a
function) instead of executing it. A dict holding the state dict under ``state_dict``,
``model`` or ``model_state_dict`` (a training checkpoint) is unwrapped. Every failure is a
:class:`~fxquant.cli.inputs.CliError` naming the file and what is wrong.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from fxquant.cli.inputs import CliError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
EXAMPLES = 3  # keys named per kind of mismatch


def load_checkpoint(model: torch.nn.Module, path: str, model_name: str = "") -> None:
    """Load the state dict in ``path`` into ``model`` (strict: every key and shape must match)."""
    file = Path(path)
    if file.is_dir():
        raise CliError(f"--checkpoint {path}: is a directory; give the .pth, .pt or .safetensors file")
    if not file.is_file():
        raise CliError(f"--checkpoint {path}: no such file")
    state = _state_dict(_read(file), path)
    _check_fits(model, state, path, model_name or type(model).__name__)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # what _check_fits does not foresee (a dtype copy_ refuses, say)
        raise CliError(f"--checkpoint {path} does not fit the model: {str(exc).splitlines()[0]}") from None


def _read(file: Path):
    if file.suffix == ".safetensors":
        return _read_safetensors(file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's protocol warnings
            return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CliError(f"--checkpoint {file}: {_unpickling_reason(file, str(exc))}") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "the file ends early"
        raise CliError(
            f"--checkpoint {file}: not a PyTorch checkpoint (torch.load: {type(exc).__name__}: "
            f"{detail[:160]}); give a file written by torch.save(model.state_dict(), PATH) or a "
            ".safetensors file"
        ) from None


def _read_safetensors(file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CliError(
            f"--checkpoint {file}: not a readable safetensors file ({str(exc).splitlines()[0]}); "
            "it may be truncated or corrupted"
        ) from None


def _unpickling_reason(file: Path, message: str) -> str:
    """What torch's weights-only unpickler refused, in one line."""
    needs = re.search(r"GLOBAL ([\w.]+)", message)
    code = needs.group(1) if needs else _pickle_global(file)
    if code:
        return (
            f"the pickle needs code to load ({code}), which fxquant does not run "
            "(torch.load with weights_only=True); in a Python session you trust, save the weights alone: "
            "torch.save(model.state_dict(), PATH), or write a .safetensors file"
        )
    reason = re.search(r"WeightsUnpickler error: *\n?\s*(.+)", message)
    detail = f": {reason.group(1).strip()[:120]}" if reason else ""
    return (
        f"not a PyTorch checkpoint (torch.load with weights_only=True cannot read it{detail}); give a file "
        "written by torch.save(model.state_dict(), PATH) or a .safetensors file"
    )


def _pickle_global(file: Path) -> str:
    """The first class or function a plain pickle file imports, read from its opcodes without
    running them ('' if it has none, or if the file is not a plain pickle)."""
    strings: list[str] = []
    try:
        with file.open("rb") as fh:
            for opcode, arg, _ in pickletools.genops(fh):
                if opcode.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except (ValueError, EOFError, struct.error, OSError):  # bytes that are not (or not all) a pickle
        return ""
    return ""


def _state_dict(loaded, path: str) -> dict[str, torch.Tensor]:
    """The parameter name -> tensor dict in what the file held."""
    state = loaded
    for key in WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise CliError(
            f"--checkpoint {path}: holds a {type(state).__name__}, not a state dict (parameter names -> tensors)"
        )
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        keys = ", ".join(repr(k) for k in list(state)[:6])
        raise CliError(
            f"--checkpoint {path}: not a state dict: entry {bad[0]!r} is of type "
            f"{type(state[bad[0]]).__name__}, not a tensor (top-level keys: {keys}); a training "
            f"checkpoint should hold its weights under one of {', '.join(WRAPPER_KEYS)}"
        )
    return dict(state)


def _examples(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:EXAMPLES])
    return shown + (", ..." if len(keys) > EXAMPLES else "")


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    """Refuse a state dict whose keys or shapes are not the model's, naming a few of them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if len(missing) == len(expected):
        problems.append(f"none of the model's {len(expected)} keys is in the file ({_examples(missing)})")
    elif missing:
        problems.append(f"{_count(missing, 'key')} of the model's {len(expected)} missing ({_examples(missing)})")
    if unexpected:
        problems.append(f"{_count(unexpected, 'key')} in the file not in the model ({_examples(unexpected)})")
    for key in expected:
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"'{key}' is {list(state[key].shape)} in the file but {list(expected[key].shape)} "
                "in the model (check --img-size and --num-classes)"
            )
            break
    if problems:
        hint = "; is it a checkpoint of another model?" if missing and unexpected else ""
        raise CliError(f"--checkpoint {path} does not fit the model {name}: {'; '.join(problems)}{hint}")
