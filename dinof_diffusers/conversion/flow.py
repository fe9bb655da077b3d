"""Conversion of published DiNof flow checkpoints (normflows layout) to a diffusers `FlowPriorModel` folder.

The published training code saves `{"optimizer", "model_0": score model, "model_1": flow, "ema_0", "ema_1", "step"}`
with `torch.save`, where `model_1` is the state dict of a normflows `MultiscaleFlow` and `ema_1` the state dict of
Song et al.'s `ExponentialMovingAverage` of the flow's parameters (`shadow_params`, in `flow.parameters()` order).
The published samples are drawn with the EMA weights, which is what `--weights auto` picks when they are present.

The state dict itself is mapped by `FlowPriorModel.from_original_state_dict` (the key map is
`dinof_diffusers.models.glow_layout`'s); this module finds it in a checkpoint file, applies the EMA and writes the
diffusers folder.

Console script `dinof-convert-flow` (also `scripts/convert_dinof_flow.py`):

    dinof-convert-flow --checkpoint checkpoint_26.pth --output_dir dinof-cifar10-flow

writes `config.json` and `diffusion_pytorch_model.safetensors` (`FlowPriorModel.save_pretrained`) to a temporary
folder next to `--output_dir` and renames it into place, so the output folder is either complete or absent.
"""

import argparse
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..file_utils import atomic_folder_path, check_writable_folder, free_space_message, is_disk_full
from ..models.flow_prior import FlowPriorModel
from ..models.glow_layout import (
    BUFFER_NAMES,
    COUPLING_TYPES,
    FLOW_MARKER_KEY,
    check_original_state_dict,
    is_flow_state_dict,
    short_key_list,
    strip_module_prefix,
)
from ..validation import check_choice

WEIGHTS = ("auto", "ema", "raw")
# --------------------------------------------------------------------------------------------------------------------
# Checkpoint files.


def _find_flow_state_dicts(obj, path: str = "", depth: int = 0) -> List[Tuple[str, Mapping]]:
    if is_flow_state_dict(obj):
        return [(path, obj)]
    found = []
    if depth < 3:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                found += _find_flow_state_dicts(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for n, v in enumerate(obj):
                found += _find_flow_state_dicts(v, f"{path}.{n}" if path else str(n), depth + 1)
    return found


def _get_path(obj, path: str):
    for part in path.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise ValueError(f"The checkpoint has no entry `{path}` (failed at `{part}`).")
    return obj


def flow_state_dict_from_checkpoint(checkpoint, key: Optional[str] = None) -> Tuple[str, Dict[str, torch.Tensor]]:
    """Finds the flow's state dict in a loaded checkpoint.

    Args:
        checkpoint: what `torch.load` returned: the flow's state dict itself, or a dict (or list) nesting it, e.g.
            the published `{"model_1": flow_state_dict, ...}`.
        key (`str`, *optional*): dotted path to the state dict (`"model_1"`, `"model.1"`); found automatically when
            exactly one nested mapping looks like a flow state dict.

    Returns:
        The path (`""` for the checkpoint itself) and the state dict.
    """
    if key:
        state_dict = _get_path(checkpoint, key)
        if not is_flow_state_dict(state_dict):
            raise ValueError(f"The checkpoint entry `{key}` is not a flow state dict (no `{FLOW_MARKER_KEY}`).")
        return key, dict(state_dict)
    found = _find_flow_state_dicts(checkpoint)
    if not found:
        keys = f"; top-level keys: {short_key_list(map(str, checkpoint))}" if isinstance(checkpoint, Mapping) else ""
        raise ValueError(f"No flow state dict (a mapping with `{FLOW_MARKER_KEY}`) in the checkpoint{keys}.")
    if len(found) > 1:
        raise ValueError(
            f"Several flow state dicts in the checkpoint ({', '.join(p or '<top>' for p, _ in found)}); choose one "
            "with `key` / --key."
        )
    path, state_dict = found[0]
    return path, dict(state_dict)


def apply_ema(state_dict: Mapping, ema_state, parameter_keys: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Replaces the parameters of a published state dict by the EMA's shadow parameters.

    Args:
        state_dict: the network's state dict (published layout, without a `module.` prefix).
        ema_state: the EMA's state dict (Song et al.'s `ExponentialMovingAverage`), `{"decay", "num_updates",
            "shadow_params": [...]}`, the shadow parameters in the published `model.parameters()` order over the
            parameters that require grad.
        parameter_keys (`List[str]`, *optional*): the state-dict keys of those parameters, in that order. Default:
            the flow's, its state dict order without the buffers (`P`, `sign_S`, `eye`, `data_dep_init_done`).
    """
    shadow = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise ValueError("The EMA entry has no `shadow_params` list.")
    state_dict = dict(state_dict)
    param_keys = parameter_keys
    if param_keys is None:
        param_keys = [k for k in state_dict if k.rsplit(".", 1)[-1] not in BUFFER_NAMES]
    if len(shadow) != len(param_keys):
        raise ValueError(
            f"The EMA has {len(shadow)} shadow parameters, but the state dict has {len(param_keys)} parameters that "
            "it averages."
        )
    for key, value in zip(param_keys, shadow):
        if not isinstance(value, torch.Tensor) or value.shape != state_dict[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"EMA shadow parameter for `{key}` has shape {got}, expected {tuple(state_dict[key].shape)}."
            )
        state_dict[key] = value
    return state_dict


def load_checkpoint(path: str, weights: str = "checkpoint['model_1']"):
    """`torch.load(path, map_location="cpu", weights_only=True)` with clear errors; `weights` is the expression (of
    `checkpoint`) that the error message suggests re-saving on its own."""
    if not os.path.isfile(path):
        raise ValueError(f"`checkpoint` {path!r} is not a file.")
    damaged = (
        f"`checkpoint` {path!r} cannot be read as a torch checkpoint ({os.path.getsize(path)} bytes): it is truncated, "
        "damaged or not a .pth file"
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{damaged}. Details: {error}") from error
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one has no central directory
            raise ValueError(f"{damaged}. Details: {error}") from error
        raise ValueError(
            f"{path!r} cannot be loaded with torch.load(weights_only=True) (it pickles more than tensors and plain "
            f"containers). Re-save just the weights, in an environment you trust: checkpoint = torch.load(path, "
            f"weights_only=False); torch.save({weights}, 'weights.pth'). Details: {error}"
        ) from error


def convert_checkpoint(
    checkpoint_path: str,
    output_dir: Optional[str] = None,
    key: Optional[str] = None,
    weights: str = "auto",
    ema_key: str = "ema_1",
    torch_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **config,
):
    """Loads a published checkpoint, converts its flow and (optionally) writes a diffusers folder atomically.

    Args:
        checkpoint_path: the `.pth` file.
        output_dir: folder to write (`save_pretrained`); not written when `None`.
        key: dotted path of the flow state dict in the checkpoint; found automatically when `None`.
        weights: `"ema"` (the EMA at `ema_key`), `"raw"` (the trained weights) or `"auto"` (EMA when present).
        ema_key: dotted path of the EMA state dict.
        torch_dtype: dtype of the converted model.
        overwrite: replace an existing non-empty `output_dir`.
        **config: `FlowPriorModel` config (`sample_size`, and checks of the inferred values).

    Returns:
        `(model, info)`, info a dict with `state_dict_key`, `weights` ("ema" or "raw").
    """
    check_choice(weights, "weights", WEIGHTS)
    check_output_dir(output_dir, overwrite)
    model, info = convert_flow(load_checkpoint(checkpoint_path), key, weights, ema_key, torch_dtype, **config)
    if output_dir is not None:
        save_pretrained_atomically(model, output_dir, overwrite=overwrite)
    return model, info


def check_output_dir(output_dir: Optional[str], overwrite: bool) -> None:
    """Raises a `ValueError` before any work if `output_dir` would not be written (a file, or not empty)."""
    if output_dir is not None and not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} exists and is not empty (pass overwrite / --overwrite).")
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} exists and is not a folder.")


def convert_flow(
    checkpoint,
    key: Optional[str] = None,
    weights: str = "auto",
    ema_key: str = "ema_1",
    torch_dtype: torch.dtype = torch.float32,
    **config,
):
    """The flow of a loaded checkpoint (what `torch.load` returned) as a `FlowPriorModel`; see `convert_checkpoint`.

    Returns:
        `(model, info)`, info a dict with `state_dict_key`, `weights` ("ema" or "raw").
    """
    check_choice(weights, "weights", WEIGHTS)
    path, state_dict = flow_state_dict_from_checkpoint(checkpoint, key)
    state_dict = strip_module_prefix(state_dict)
    check_original_state_dict(state_dict, **config)  # before the EMA, whose errors would be less clear
    used = "raw"
    if weights != "raw":
        try:
            ema_state = _get_path(checkpoint, ema_key)
        except ValueError:
            if weights == "ema":
                raise
            ema_state = None
        if ema_state is not None:
            state_dict = apply_ema(state_dict, ema_state)
            used = "ema"
    model = FlowPriorModel.from_original_state_dict(state_dict, torch_dtype=torch_dtype, **config)
    return model, {"state_dict_key": path, "weights": used}


def save_pretrained_atomically(model, output_dir: str, overwrite: bool = False) -> None:
    """`model.save_pretrained` (a model or a pipeline) into a temporary sibling folder, then renamed to `output_dir`."""
    try:
        with atomic_folder_path(output_dir, if_exists="replace" if overwrite else "raise") as temporary_path:
            model.save_pretrained(temporary_path, safe_serialization=True)
    except FileExistsError:
        raise ValueError(f"`output_dir` {os.path.abspath(output_dir)!r} exists and is not empty.") from None


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def converter_parser(prog: str, description: str, output: str) -> argparse.ArgumentParser:
    """The parser of a converter script, with its --checkpoint and --output_dir (`output` says what is written)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--checkpoint", required=True, help="the .pth checkpoint (loaded with weights_only=True)")
    parser.add_argument("--output_dir", required=True, help=f"{output} to write; written atomically")
    return parser


def add_output_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--dtype and --overwrite, the last options of a converter script."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "dinof-convert-flow",
        "Convert a published DiNof flow checkpoint (normflows MultiscaleFlow) to a diffusers FlowPriorModel folder "
        "(config.json + safetensors).",
        "folder",
    )
    parser.add_argument(
        "--key",
        default=None,
        help="dotted path of the flow state dict in the checkpoint (default: found, e.g. model_1)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="EMA weights (what the published samples use), the raw trained weights, or EMA when present (default)",
    )
    parser.add_argument("--ema_key", default="ema_1", help="dotted path of the flow's EMA state dict (default ema_1)")
    parser.add_argument("--sample_size", type=int, default=32, help="image size the flow was trained on (default 32)")
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels"):
        parser.add_argument(f"--{name}", type=int, default=None, help="checked against the checkpoint if given")
    parser.add_argument("--coupling", choices=COUPLING_TYPES, default=None)
    return add_output_options(parser)


def run_conversion(prog: str, output_dir: str, convert: Callable[[], Any]) -> Optional[Any]:
    """`convert()` as a converter script runs it: the folder that will hold `output_dir` must be writable (checked
    first); a `ValueError` or a full disk is printed as `<prog>: error: ...` and gives `None`."""
    try:
        check_writable_folder(os.path.dirname(os.path.abspath(output_dir)), "The folder of --output_dir")
        return convert()
    except ValueError as error:
        message = str(error)
    except OSError as error:
        if not is_disk_full(error):
            raise
        message = f"the disk is full: {output_dir!r} was not written ({free_space_message(output_dir)})"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `dinof-convert-flow`; returns the exit status (0 on success, 1 on a conversion error)."""
    args = build_parser().parse_args(argv)
    config = {"sample_size": args.sample_size}
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels", "coupling"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    result = run_conversion(
        "dinof-convert-flow",
        args.output_dir,
        lambda: convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            key=args.key,
            weights=args.weights,
            ema_key=args.ema_key,
            torch_dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
            **config,
        ),
    )
    if result is None:
        return 1
    model, info = result
    num_params = sum(p.numel() for p in model.parameters())
    cfg = {k: model.config[k] for k in ("sample_size", "in_channels", "num_levels", "flow_depth", "hidden_channels")}
    print(
        f"Converted `{info['state_dict_key'] or '<checkpoint>'}` ({info['weights']} weights, {num_params:,} "
        f"parameters, {cfg}, coupling={model.config.coupling!r}) -> {os.path.abspath(args.output_dir)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
