"""Conversion of published DiNof flow checkpoints (normflows layout) to a diffusers `FlowPriorModel` folder.

The published training code saves `{"optimizer", "model_0": score model, "model_1": flow, "ema_0", "ema_1", "step"}`
with `torch.save`, where `model_1` is the state dict of a normflows `MultiscaleFlow` and `ema_1` the state dict of
Song et al.'s `ExponentialMovingAverage` of the flow's parameters (`shadow_params`, in `flow.parameters()` order).
The published samples are drawn with the EMA weights, which is what `--weights auto` picks when they are present.

Console script `dinof-convert-flow` (also `scripts/convert_dinof_flow.py`):

    dinof-convert-flow --checkpoint checkpoint_26.pth --output_dir dinof-cifar10-flow

writes `config.json` and `diffusion_pytorch_model.safetensors` (`FlowPriorModel.save_pretrained`) to a temporary
folder next to `--output_dir` and renames it into place, so the output folder is either complete or absent.
"""

import argparse
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch

FLOW_MARKER_KEY = "q0.0.loc"
BUFFER_NAMES = ("P", "sign_S", "eye", "data_dep_init_done")
_BASE_NAMES = ("loc", "loc_logs", "log_scale", "log_scale_logs")
_NET = "flows.0.flows.1.param_map.net"
_MAX_LISTED = 12


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def strip_module_prefix(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """Removes a `module.` prefix that every key carries (DataParallel / DistributedDataParallel)."""
    keys = list(state_dict.keys())
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def is_flow_state_dict(obj) -> bool:
    """Whether obj looks like the state dict of a published flow (has `q0.0.loc`, possibly behind `module.`)."""
    return isinstance(obj, Mapping) and (FLOW_MARKER_KEY in obj or f"module.{FLOW_MARKER_KEY}" in obj)


def infer_original_config(state_dict: Mapping) -> Dict:
    """Reads `in_channels`, `num_levels`, `flow_depth`, `hidden_channels` and `coupling` from a published state dict.

    Raises:
        ValueError: the keys needed to read them are missing, or the state dict is of an unsupported variant.
    """
    if any(re.fullmatch(r"q0\.\d+\.(loc_cc|log_scale_cc)", k) for k in state_dict):
        raise ValueError(
            "The state dict has class-conditional base distributions (`q0.*.loc_cc`), which FlowPriorModel does not "
            "support (unconditional GlowBase only)."
        )
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"q0\.(\d+)\.", k))}
    if not levels:
        raise ValueError(f"Not a published flow state dict: missing key `{FLOW_MARKER_KEY}` (no `q0.*` keys).")
    num_levels = max(levels) + 1
    depths = {int(m.group(1)) for k in state_dict if (m := re.match(r"flows\.0\.(\d+)\.flows\.1\.L$", k))}
    if not depths:
        raise ValueError("Cannot read `flow_depth`: missing key `flows.0.0.flows.1.L`.")
    flow_depth = max(depths) + 1
    loc = state_dict.get(FLOW_MARKER_KEY)
    if loc is None:
        raise ValueError(f"Missing key `{FLOW_MARKER_KEY}`.")
    if loc.ndim != 4 or loc.shape[0] != 1 or loc.shape[2:] != (1, 1):
        raise ValueError(
            f"`{FLOW_MARKER_KEY}` has shape {tuple(loc.shape)}, not (1, C, 1, 1): this is not the GlowBase base "
            "distribution of the published layout (class-conditional or per-pixel bases are not supported)."
        )
    level0_channels = loc.shape[1]
    if level0_channels % 2 ** (num_levels + 1):
        raise ValueError(
            f"`{FLOW_MARKER_KEY}` has {level0_channels} channels, not a multiple of 2 ** (num_levels + 1) = "
            f"{2 ** (num_levels + 1)} (num_levels={num_levels})."
        )
    key = f"flows.0.0.{_NET}.0.weight"
    if key not in state_dict:
        raise ValueError(f"Cannot read `hidden_channels`: missing key `{key}`.")
    hidden_channels = state_dict[key].shape[0]
    key = f"flows.0.0.{_NET}.4.weight"
    if key not in state_dict:
        raise ValueError(f"Cannot read `coupling`: missing key `{key}`.")
    out_channels = state_dict[key].shape[0]
    coupling = "affine" if out_channels == 2 * (level0_channels // 2) else "additive"
    return {
        "in_channels": level0_channels // 2 ** (num_levels + 1),
        "num_levels": num_levels,
        "flow_depth": flow_depth,
        "hidden_channels": hidden_channels,
        "coupling": coupling,
    }


def expected_original_shapes(config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the published state dict of a flow with this `FlowPriorModel` config."""
    c, num_levels, depth = config["in_channels"], config["num_levels"], config["flow_depth"]
    hidden = config["hidden_channels"]
    shapes = {}
    for i in range(num_levels):
        channels = c * 2 ** (num_levels + 1 - i)
        latent_channels = channels if i == 0 else channels // 2
        for name in _BASE_NAMES:
            shapes[f"q0.{i}.{name}"] = (1, latent_channels, 1, 1)
        c_in, c_rest = (channels + 1) // 2, channels // 2
        c_out = 2 * c_rest if config["coupling"] == "affine" else c_rest
        for k in range(depth):
            p = f"flows.{i}.{k}"
            shapes.update(
                {
                    f"{p}.{_NET}.0.weight": (hidden, c_in, 3, 3),
                    f"{p}.{_NET}.0.bias": (hidden,),
                    f"{p}.{_NET}.2.weight": (hidden, hidden, 1, 1),
                    f"{p}.{_NET}.2.bias": (hidden,),
                    f"{p}.{_NET}.4.weight": (c_out, hidden, 3, 3),
                    f"{p}.{_NET}.4.bias": (c_out,),
                    f"{p}.flows.1.L": (channels, channels),
                    f"{p}.flows.1.U": (channels, channels),
                    f"{p}.flows.1.P": (channels, channels),
                    f"{p}.flows.1.eye": (channels, channels),
                    f"{p}.flows.1.log_S": (channels,),
                    f"{p}.flows.1.sign_S": (channels,),
                    f"{p}.flows.2.s": (1, channels, 1, 1),
                    f"{p}.flows.2.t": (1, channels, 1, 1),
                    f"{p}.flows.2.data_dep_init_done": (),
                }
            )
    return shapes


def check_original_state_dict(state_dict: Mapping, **config) -> Dict:
    """Checks a published flow state dict (keys, shapes, variant) against a `FlowPriorModel` config.

    Args:
        state_dict: the flow's state dict, without a `module.` prefix.
        **config: `FlowPriorModel` config; what is not given is read from the state dict.

    Returns:
        The full config (`in_channels`, `num_levels`, `flow_depth`, `hidden_channels`, `coupling` and, when given,
        `sample_size`).

    Raises:
        ValueError: naming the missing and unexpected keys and the shape mismatches.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"`state_dict` must be a mapping of key -> tensor, got {type(state_dict).__name__}.")
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(f"`state_dict` values must be tensors; not for: {_listing(non_tensors)}.")
    inferred = infer_original_config(state_dict)
    unknown = set(config) - {"sample_size", *inferred}
    if unknown:
        raise ValueError(f"Unknown FlowPriorModel config: {_listing(unknown)}.")
    full_config = {**inferred, **config}
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels"):
        value = full_config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if full_config["coupling"] not in ("affine", "additive"):
        raise ValueError(f"`coupling` must be one of ('affine', 'additive'), got {full_config['coupling']!r}.")

    expected = expected_original_shapes(full_config)
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    mismatched = [
        f"{k}: expected {expected[k]}, got {tuple(state_dict[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k] and not (expected[k] == () and state_dict[k].numel() == 1)
    ]
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:_MAX_LISTED]))
    if problems:
        cfg = ", ".join(
            f"{k}={full_config[k]!r}"
            for k in ("in_channels", "num_levels", "flow_depth", "hidden_channels", "coupling")
        )
        raise ValueError(
            f"The state dict does not fit the published flow layout for FlowPriorModel({cfg}): " + " | ".join(problems)
        )
    return full_config


def convert_original_state_dict(model_cls, state_dict: Mapping, torch_dtype: Optional[torch.dtype] = None, **config):
    """`FlowPriorModel.from_original_state_dict`: see there. `torch_dtype` defaults to the state dict's dtype."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"`state_dict` must be a mapping of key -> tensor, got {type(state_dict).__name__}.")
    state_dict = strip_module_prefix(state_dict)
    full_config = check_original_state_dict(state_dict, **config)
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}  # the model is built on the CPU
    model = model_cls(**full_config)
    if torch_dtype is None:
        torch_dtype = state_dict[FLOW_MARKER_KEY].dtype
    if not torch_dtype.is_floating_point:
        raise ValueError(f"`torch_dtype` must be a floating point dtype, got {torch_dtype}.")
    expected = expected_original_shapes(model.config)

    new_state = {}
    not_initialized = []
    for i in range(model.config.num_levels):
        steps = range(model.config.flow_depth)

        def stack(suffix, level=i, steps=steps):
            return torch.stack([state_dict[f"flows.{level}.{k}.{suffix}"] for k in steps])

        channels = expected[f"flows.{i}.0.flows.1.L"][0]
        eye = stack("flows.1.eye")
        if not torch.equal(eye, torch.eye(channels, dtype=eye.dtype).expand_as(eye)):
            raise ValueError(f"`flows.{i}.*.flows.1.eye` is not the identity matrix.")
        prefix = f"levels.{i}."
        done = stack("flows.2.data_dep_init_done").reshape(-1) > 0
        not_initialized += [f"flows.{i}.{k}" for k in steps if not done[k]]
        new_state.update(
            {
                prefix + "actnorm_log_scale": stack("flows.2.s").reshape(len(steps), channels),
                prefix + "actnorm_shift": stack("flows.2.t").reshape(len(steps), channels),
                prefix + "actnorm_initialized": done,
                prefix + "conv_permutation": stack("flows.1.P"),
                prefix + "conv_sign_s": stack("flows.1.sign_S"),
                prefix + "conv_lower": stack("flows.1.L"),
                prefix + "conv_upper": stack("flows.1.U"),
                prefix + "conv_log_s": stack("flows.1.log_S"),
            }
        )
        for n, layer in ((1, 0), (2, 2), (3, 4)):
            new_state[prefix + f"coupling_conv{n}_weight"] = stack(f"{_NET}.{layer}.weight")
            new_state[prefix + f"coupling_conv{n}_bias"] = stack(f"{_NET}.{layer}.bias")
        for name in _BASE_NAMES:
            new_state[prefix + "prior_" + name] = state_dict[f"q0.{i}.{name}"].reshape(-1)
    if not_initialized:
        from diffusers.utils import logging

        logging.get_logger(__name__).warning(
            f"ActNorm of {_listing(not_initialized)} is not initialised in the state dict; it will be initialised "
            "on the first density-direction batch."
        )
    # nn.Module.to: ModelMixin.to warns about `_keep_in_fp32_modules` on every dtype cast, even when there are none.
    model = torch.nn.Module.to(model, dtype=torch_dtype)
    new_state = {k: (v if v.dtype == torch.bool else v.to(torch_dtype)) for k, v in new_state.items()}
    model.load_state_dict(new_state, strict=True)
    return model.eval()


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
        raise ValueError(
            f"No flow state dict (a mapping with `{FLOW_MARKER_KEY}`) in the checkpoint"
            + (f"; top-level keys: {_listing(map(str, checkpoint.keys()))}" if isinstance(checkpoint, Mapping) else "")
            + "."
        )
    if len(found) > 1:
        raise ValueError(
            f"Several flow state dicts in the checkpoint ({', '.join(p or '<top>' for p, _ in found)}); choose one "
            "with `key` / --key."
        )
    path, state_dict = found[0]
    return path, dict(state_dict)


def apply_ema(state_dict: Mapping, ema_state) -> Dict[str, torch.Tensor]:
    """Replaces the parameters of a published flow state dict by the EMA's shadow parameters.

    Args:
        state_dict: the flow's state dict (normflows layout).
        ema_state: the EMA's state dict, `{"decay", "num_updates", "shadow_params": [...]}`, shadow parameters in
            `flow.parameters()` order, which is the state dict order without the buffers (`P`, `sign_S`, `eye`,
            `data_dep_init_done`).
    """
    shadow = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise ValueError("The EMA entry has no `shadow_params` list.")
    state_dict = dict(state_dict)
    param_keys = [k for k in state_dict if k.rsplit(".", 1)[-1] not in BUFFER_NAMES]
    if len(shadow) != len(param_keys):
        raise ValueError(
            f"The EMA has {len(shadow)} shadow parameters, but the flow state dict has {len(param_keys)} parameters."
        )
    for key, value in zip(param_keys, shadow):
        if not isinstance(value, torch.Tensor) or value.shape != state_dict[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"EMA shadow parameter for `{key}` has shape {got}, expected {tuple(state_dict[key].shape)}."
            )
        state_dict[key] = value
    return state_dict


def load_checkpoint(path: str):
    """`torch.load(path, map_location="cpu", weights_only=True)` with clear errors."""
    if not os.path.isfile(path):
        raise ValueError(f"`checkpoint` {path!r} is not a file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path!r} cannot be loaded with torch.load(weights_only=True) (it pickles more than tensors and plain "
            "containers). Re-save just the flow: torch.save(torch.load(path, weights_only=False)['model_1'], "
            f"'flow.pth'), in an environment you trust. Details: {error}"
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
    from .models.flow_prior import FlowPriorModel

    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"`weights` must be one of ('auto', 'ema', 'raw'), got {weights!r}.")
    if output_dir is not None and not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} exists and is not empty (pass overwrite / --overwrite).")
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`output_dir` {output_dir!r} exists and is not a folder.")
    checkpoint = load_checkpoint(checkpoint_path)
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
    if output_dir is not None:
        save_pretrained_atomically(model, output_dir, overwrite=overwrite)
    return model, {"state_dict_key": path, "weights": used}


def save_pretrained_atomically(model, output_dir: str, overwrite: bool = False) -> None:
    """`model.save_pretrained` into a temporary sibling folder, then renamed to `output_dir`."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            if not overwrite:
                raise ValueError(f"`output_dir` {output_dir!r} exists and is not empty.")
            old_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(old_dir, "old"))
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, output_dir)  # also replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinof-convert-flow",
        description="Convert a published DiNof flow checkpoint (normflows MultiscaleFlow) to a diffusers "
        "FlowPriorModel folder (config.json + safetensors).",
    )
    parser.add_argument("--checkpoint", required=True, help="the .pth checkpoint (loaded with weights_only=True)")
    parser.add_argument("--output_dir", required=True, help="folder to write; written atomically")
    parser.add_argument(
        "--key",
        default=None,
        help="dotted path of the flow state dict in the checkpoint (default: found, e.g. model_1)",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="EMA weights (what the published samples use), the raw trained weights, or EMA when present (default)",
    )
    parser.add_argument("--ema_key", default="ema_1", help="dotted path of the flow's EMA state dict (default ema_1)")
    parser.add_argument("--sample_size", type=int, default=32, help="image size the flow was trained on (default 32)")
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels"):
        parser.add_argument(f"--{name}", type=int, default=None, help="checked against the checkpoint if given")
    parser.add_argument("--coupling", choices=("affine", "additive"), default=None)
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `dinof-convert-flow`; returns the exit status (0 on success, 1 on a conversion error)."""
    args = build_parser().parse_args(argv)
    config = {"sample_size": args.sample_size}
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels", "coupling"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    try:
        model, info = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            key=args.key,
            weights=args.weights,
            ema_key=args.ema_key,
            torch_dtype=_DTYPES[args.dtype],
            overwrite=args.overwrite,
            **config,
        )
    except ValueError as error:
        print(f"dinof-convert-flow: error: {error}", file=sys.stderr)
        return 1
    num_params = sum(p.numel() for p in model.parameters())
    cfg = {k: model.config[k] for k in ("sample_size", "in_channels", "num_levels", "flow_depth", "hidden_channels")}
    print(
        f"Converted `{info['state_dict_key'] or '<checkpoint>'}` ({info['weights']} weights, {num_params:,} "
        f"parameters, {cfg}, coupling={model.config.coupling!r}) -> {os.path.abspath(args.output_dir)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
