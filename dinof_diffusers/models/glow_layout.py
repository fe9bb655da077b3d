"""The layout of the multi-scale Glow prior: its per-level shapes, its coupling split, the published state-dict keys.

This module is the one place that knows how the published DiNof flow (normflows' `MultiscaleFlow` of `GlowBlock`s,
docs/DESIGN.md, "The Glow flow prior") is laid out; `FlowPriorModel`, the checkpoint conversion, the benchmarks and
the tests ask it instead of repeating the formulas.

Levels are numbered i = 0 (the coarsest) ... L-1 (the finest). With C image channels, level i works on
C * 2^(L+1-i) channels at 1 / 2^(L-i) of the image size (after its squeeze); its latent is the whole tensor at
level 0 and the second half of the channels at i > 0. A coupling conditions on the first ceil(c/2) of its c
channels and transforms the other floor(c/2).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import torch

from ..validation import check_choice, check_positive_int

COUPLING_TYPES = ("affine", "additive")

# The published state dict: `q0.{i}.*` base distributions, `flows.{i}.{k}.*` the K steps of level i (normflows'
# GlowBlock = flows.0 coupling, flows.1 invertible 1x1 convolution, flows.2 ActNorm); flows.{i}.{K} is the squeeze.
FLOW_MARKER_KEY = "q0.0.loc"
BUFFER_NAMES = ("P", "sign_S", "eye", "data_dep_init_done")
_BASE_NAMES = ("loc", "loc_logs", "log_scale", "log_scale_logs")
_NET = "flows.0.flows.1.param_map.net"
# FlowPriorModel's stacked per-level tensors (`levels.{i}.<name>`, K steps along dim 0) <- the published key of step k
# (`flows.{i}.{k}.<key>`).
STEP_KEYS = {
    "actnorm_log_scale": "flows.2.s",
    "actnorm_shift": "flows.2.t",
    "actnorm_initialized": "flows.2.data_dep_init_done",
    "conv_permutation": "flows.1.P",
    "conv_sign_s": "flows.1.sign_S",
    "conv_lower": "flows.1.L",
    "conv_upper": "flows.1.U",
    "conv_log_s": "flows.1.log_S",
    "coupling_conv1_weight": f"{_NET}.0.weight",
    "coupling_conv1_bias": f"{_NET}.0.bias",
    "coupling_conv2_weight": f"{_NET}.2.weight",
    "coupling_conv2_bias": f"{_NET}.2.bias",
    "coupling_conv3_weight": f"{_NET}.4.weight",
    "coupling_conv3_bias": f"{_NET}.4.bias",
}
# FlowPriorModel's per-level base distribution parameters (`levels.{i}.<name>`, (C_z,)) <- `q0.{i}.<key>` (1, C_z, 1, 1).
BASE_KEYS = {f"prior_{name}": name for name in _BASE_NAMES}
_MAX_LISTED = 12


@dataclass(frozen=True)
class GlowLayout:
    """The shapes of a multi-scale Glow with `in_channels` image channels and `num_levels` levels."""

    in_channels: int
    num_levels: int

    def level_channels(self, level: int) -> int:
        """C * 2^(L+1-i): the channels level i's steps work on (after its squeeze)."""
        return self.in_channels * 2 ** (self.num_levels + 1 - level)

    def latent_channels(self, level: int) -> int:
        """The channels of level i's latent: all of them at level 0, the second half at i > 0."""
        channels = self.level_channels(level)
        return channels if level == 0 else channels // 2

    def level_size(self, level: int, height: int, width: int) -> Tuple[int, int]:
        """The (height, width) level i works on for an image of (height, width): 1 / 2^(L-i) of it."""
        scale = 2 ** (self.num_levels - level)
        return height // scale, width // scale

    def latent_shapes(self, height: int, width: int) -> List[Tuple[int, int, int]]:
        """The per-level latent shapes (C, H, W) of an image of (height, width), level 0 first."""
        return [(self.latent_channels(i), *self.level_size(i, height, width)) for i in range(self.num_levels)]


def coupling_split(channels: int) -> Tuple[int, int]:
    """(ceil(c/2), floor(c/2)): the channels a coupling conditions on, and those it transforms."""
    return (channels + 1) // 2, channels // 2


def coupling_out_channels(channels: int, coupling: str) -> int:
    """The coupling network's output channels: shift and scale interleaved (affine), or the shift (additive)."""
    transformed = coupling_split(channels)[1]
    return 2 * transformed if coupling == "affine" else transformed


# ----------------------------------------------------------------------------------------------------------------------
# The published state dict
# ----------------------------------------------------------------------------------------------------------------------


def short_key_list(keys: Iterable) -> str:
    """The first keys of a sorted listing, and how many more there are, for error messages."""
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
    per_image_channel = GlowLayout(1, num_levels).level_channels(0)
    if level0_channels % per_image_channel:
        raise ValueError(
            f"`{FLOW_MARKER_KEY}` has {level0_channels} channels, not a multiple of 2 ** (num_levels + 1) = "
            f"{per_image_channel} (num_levels={num_levels})."
        )
    key = f"flows.0.0.{STEP_KEYS['coupling_conv1_weight']}"
    if key not in state_dict:
        raise ValueError(f"Cannot read `hidden_channels`: missing key `{key}`.")
    hidden_channels = state_dict[key].shape[0]
    key = f"flows.0.0.{STEP_KEYS['coupling_conv3_weight']}"
    if key not in state_dict:
        raise ValueError(f"Cannot read `coupling`: missing key `{key}`.")
    out_channels = state_dict[key].shape[0]
    coupling = "affine" if out_channels == coupling_out_channels(level0_channels, "affine") else "additive"
    return {
        "in_channels": level0_channels // per_image_channel,
        "num_levels": num_levels,
        "flow_depth": flow_depth,
        "hidden_channels": hidden_channels,
        "coupling": coupling,
    }


def expected_original_shapes(config: Mapping) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the published state dict of a flow with this `FlowPriorModel` config."""
    layout = GlowLayout(config["in_channels"], config["num_levels"])
    hidden = config["hidden_channels"]
    shapes = {}
    for i in range(layout.num_levels):
        channels = layout.level_channels(i)
        for name in _BASE_NAMES:
            shapes[f"q0.{i}.{name}"] = (1, layout.latent_channels(i), 1, 1)
        conditioning = coupling_split(channels)[0]
        out_channels = coupling_out_channels(channels, config["coupling"])
        step_shapes = {
            "coupling_conv1_weight": (hidden, conditioning, 3, 3),
            "coupling_conv1_bias": (hidden,),
            "coupling_conv2_weight": (hidden, hidden, 1, 1),
            "coupling_conv2_bias": (hidden,),
            "coupling_conv3_weight": (out_channels, hidden, 3, 3),
            "coupling_conv3_bias": (out_channels,),
            "conv_lower": (channels, channels),
            "conv_upper": (channels, channels),
            "conv_permutation": (channels, channels),
            "conv_log_s": (channels,),
            "conv_sign_s": (channels,),
            "actnorm_log_scale": (1, channels, 1, 1),
            "actnorm_shift": (1, channels, 1, 1),
            "actnorm_initialized": (),
        }
        for k in range(config["flow_depth"]):
            shapes.update({f"flows.{i}.{k}.{STEP_KEYS[name]}": shape for name, shape in step_shapes.items()})
            shapes[f"flows.{i}.{k}.flows.1.eye"] = (channels, channels)
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
        raise ValueError(f"`state_dict` values must be tensors; not for: {short_key_list(non_tensors)}.")
    inferred = infer_original_config(state_dict)
    unknown = set(config) - {"sample_size", *inferred}
    if unknown:
        raise ValueError(f"Unknown FlowPriorModel config: {short_key_list(unknown)}.")
    full_config = {**inferred, **config}
    for name in ("in_channels", "num_levels", "flow_depth", "hidden_channels"):
        check_positive_int(full_config[name], name)
    check_choice(full_config["coupling"], "coupling", COUPLING_TYPES)

    expected = expected_original_shapes(full_config)
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {short_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_key_list(unexpected)}")
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


def original_to_diffusers_state_dict(
    state_dict: Mapping, config: Mapping
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Maps a checked published state dict (`check_original_state_dict`) onto `FlowPriorModel`'s parameter names.

    Returns:
        The new state dict (the K steps of a level stacked along dim 0; ActNorm flags as bool) and the published
        steps whose ActNorm is not initialised (`flows.{i}.{k}`).

    Raises:
        ValueError: if an `eye` buffer is not the identity.
    """
    layout = GlowLayout(config["in_channels"], config["num_levels"])
    depth = config["flow_depth"]
    new_state, not_initialized = {}, []
    for i in range(layout.num_levels):
        channels = layout.level_channels(i)

        def stack(key, level=i):
            return torch.stack([state_dict[f"flows.{level}.{k}.{key}"] for k in range(depth)])

        eye = stack("flows.1.eye")
        if not torch.equal(eye, torch.eye(channels, dtype=eye.dtype).expand_as(eye)):
            raise ValueError(f"`flows.{i}.*.flows.1.eye` is not the identity matrix.")
        prefix = f"levels.{i}."
        for name, key in STEP_KEYS.items():
            new_state[prefix + name] = stack(key)
        for name in ("actnorm_log_scale", "actnorm_shift"):  # (K, 1, C, 1, 1) -> (K, C)
            new_state[prefix + name] = new_state[prefix + name].reshape(depth, channels)
        done = new_state[prefix + "actnorm_initialized"].reshape(-1) > 0
        new_state[prefix + "actnorm_initialized"] = done
        not_initialized += [f"flows.{i}.{k}" for k in range(depth) if not done[k]]
        for name, key in BASE_KEYS.items():
            new_state[prefix + name] = state_dict[f"q0.{i}.{key}"].reshape(-1)
    return new_state, not_initialized
