"""Published DiNof and score-SDE checkpoints -> a complete `DiNofPipeline` folder.

Two layouts, as their training code saves them with `torch.save` (read here with `torch.load(weights_only=True)`):

- DiNof (MohsenZand/DiNof `utils.save_checkpoint`, `checkpoint_N.pth`): `model_0` the score network (`NCSNpp`),
  `model_1` the flow (normflows `MultiscaleFlow`), `ema_0` / `ema_1` their EMAs, `optimizer`, `step`. The score
  network is not wrapped in `DataParallel` there.
- score_sde_pytorch (`utils.save_checkpoint`): `model` the score network (`DataParallel`: keys `module.all_modules...`),
  `ema` its EMA, `optimizer`, `step`; no flow. The pipeline it gives samples from the SDE prior at T and is ready for
  `train.py --train_component flow --pretrained_model_name_or_path <folder>`.

An EMA is `{decay, num_updates, shadow_params}` (Song et al.'s `ExponentialMovingAverage`), `shadow_params` a list in
`model.parameters()` order over the parameters that require grad (for NCSN++ every one but the Fourier features'
`W`: `NCSNppModel.original_parameter_names()`). The EMA weights are used by default, as the published evaluation does
(`--no_ema`: the raw weights).

The network options are those of one of the seven published configs (`--config`, or inferred from the state dict's
keys and shapes and its `sigmas` buffer where exactly one fits); `--model_config` overrides some of them for a
network trained with other options. The scheduler is the published config's (`DINOF_PUBLISHED_SCHEDULER_CONFIGS`)
with N, sigma_min and sigma_max read from the checkpoint's `sigmas` (`model.num_scales`, `model.sigma_min/max`, which
the published code also gives its SDE): e.g. N = 2000 for score_sde's CelebA-HQ-256 checkpoint.

Console script `dinof-convert-checkpoint` (also `scripts/convert_dinof_checkpoint.py`):

    dinof-convert-checkpoint --checkpoint checkpoint_26.pth --output_dir dinof-cifar10-ve [--config ncsnpp-cifar10-ve]
"""

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models.glow_layout import short_key_list, strip_module_prefix
from ..models.ncsnpp import NCSNppModel
from ..models.ncsnpp_configs import NCSNPP_PUBLISHED_CONFIGS
from ..pipelines.dinof import DiNofPipeline
from ..schedulers.published_configs import DINOF_PUBLISHED_SCHEDULER_CONFIGS
from ..schedulers.scheduling_dinof import DiNofScheduler
from ..validation import check_choice
from .flow import (
    DTYPES,
    add_output_options,
    apply_ema,
    check_output_dir,
    convert_flow,
    converter_parser,
    load_checkpoint,
    run_conversion,
    save_pretrained_atomically,
)

PUBLISHED_CONFIG_NAMES = tuple(NCSNPP_PUBLISHED_CONFIGS)
# layout -> (score network, its EMA, flow, its EMA); the flow entries are None where the layout has no flow.
LAYOUTS = {
    "dinof": ("model_0", "ema_0", "model_1", "ema_1"),
    "score_sde": ("model", "ema", None, None),
}
_SIGMAS = "sigmas"


def checkpoint_layout(checkpoint) -> str:
    """ "dinof" or "score_sde", from the checkpoint's top-level keys; a `ValueError` listing them otherwise."""
    if isinstance(checkpoint, Mapping):
        for layout, (model, _, flow, _) in LAYOUTS.items():
            if model in checkpoint and (flow is None or flow in checkpoint):
                return layout
    keys = short_key_list(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(
        "The checkpoint is neither DiNof's (`model_0`, `model_1`, `ema_0`, `ema_1`, `optimizer`, `step`) nor "
        f"score_sde_pytorch's (`model`, `ema`, `optimizer`, `step`); it holds {keys}."
    )


def _noise_levels(state_dict: Mapping) -> Dict[str, Any]:
    """sigma_min, sigma_max and num_scales of the published `sigmas` buffer (exp(linspace(log max, log min, N)))."""
    sigmas = state_dict.get(_SIGMAS)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"The score network's state dict has no `{_SIGMAS}` buffer of the published NCSN++ layout.")
    # exp(log sigma) moves the last bits of the configured values (50 -> 49.99999999999999): 6 significant digits
    return {"sigma_max": float(f"{sigmas[0]:.6g}"), "sigma_min": float(f"{sigmas[-1]:.6g}"), "num_scales": len(sigmas)}


@functools.lru_cache(maxsize=32)
def _published_shapes(config_json: str) -> Dict[str, Tuple[int, ...]]:
    """Published key -> shape of an NCSNppModel of this config (JSON), built on the meta device once."""
    with torch.device("meta"):
        model = NCSNppModel(**json.loads(config_json))
    meta_state = model.state_dict()
    return {published: tuple(meta_state[key].shape) for key, published in model.original_key_map().items()}


def _layout_problems(state_dict: Mapping, config: Mapping) -> List[str]:
    """What keeps `state_dict` from fitting an NCSNppModel of `config`: its keys and shapes and its SMLD noise range."""
    expected = _published_shapes(json.dumps(config, sort_keys=True))
    given = {key: tuple(value.shape) for key, value in state_dict.items() if key != _SIGMAS}
    problems = []
    for label, keys in (("missing", expected.keys() - given.keys()), ("unexpected", given.keys() - expected.keys())):
        if keys:
            problems.append(f"{len(keys)} {label} keys")
    mis_shaped = [key for key in expected.keys() & given.keys() if expected[key] != given[key]]
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped keys")
    levels = _noise_levels(state_dict)
    for name in ("sigma_min", "sigma_max"):
        if abs(levels[name] - config[name]) > 1e-5 * config[name]:
            problems.append(f"{name} {levels[name]:g} (the config's is {config[name]:g})")
    return problems


def infer_published_config(state_dict: Mapping, model_config: Optional[Mapping] = None) -> str:
    """The name of the published config whose network (with `model_config`'s overrides) the state dict is.

    Raises:
        ValueError: no published config fits (each one's problems listed) or several do (named: pass one).
    """
    state_dict = strip_module_prefix(state_dict)
    problems = {
        name: _layout_problems(state_dict, {**config, **(model_config or {})})
        for name, config in NCSNPP_PUBLISHED_CONFIGS.items()
    }
    fitting = [name for name, found in problems.items() if not found]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        raise ValueError(
            f"The score network fits several published configs, {', '.join(fitting)} (the same network; their SDE "
            "or sampler differ): choose one with `config` / --config."
        )
    listed = "; ".join(f"{name}: {', '.join(found)}" for name, found in problems.items())
    raise ValueError(
        f"The score network fits none of the published configs ({listed}). Give its options with `model_config` / "
        "--model_config."
    )


def convert_score_network(
    checkpoint, layout: str, config: Mapping, use_ema: bool = True, torch_dtype: torch.dtype = torch.float32
) -> Tuple[NCSNppModel, Dict[str, Any]]:
    """The score network of a loaded checkpoint as an `NCSNppModel` of `config` (EMA weights unless `use_ema=False`).

    Returns:
        `(model, info)`, info a dict with `weights` ("ema" or "raw"), `ema_decay` and `ema_num_updates`.
    """
    model_key, ema_key, _, _ = LAYOUTS[layout]
    state_dict = strip_module_prefix(checkpoint[model_key])
    info = {"weights": "raw", "ema_decay": None, "ema_num_updates": None}
    if use_ema:
        ema_state = checkpoint.get(ema_key)
        if ema_state is None:
            raise ValueError(f"The checkpoint has no `{ema_key}` (the score network's EMA): pass --no_ema.")
        with torch.device("meta"):
            parameter_keys = NCSNppModel(**config).original_parameter_names(requires_grad_only=True)
        state_dict = apply_ema(state_dict, ema_state, parameter_keys)
        info.update(weights="ema", ema_decay=ema_state.get("decay"), ema_num_updates=ema_state.get("num_updates"))
    return NCSNppModel.from_original_state_dict(state_dict, torch_dtype=torch_dtype, **config), info


def convert_checkpoint(
    checkpoint_path: str,
    output_dir: Optional[str] = None,
    config: Optional[str] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    torch_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Tuple[DiNofPipeline, Dict[str, Any]]:
    """Loads a DiNof or score_sde_pytorch checkpoint and converts it to a `DiNofPipeline` (written atomically).

    Args:
        checkpoint_path (`str`): the `.pth` file, read with `torch.load(weights_only=True)`.
        output_dir (`str`, *optional*): the pipeline folder to write (`save_pretrained`); not written when `None`.
        config (`str`, *optional*): one of the seven published configs (`PUBLISHED_CONFIG_NAMES`); inferred from the
            score network's state dict when `None`.
        model_config (`Mapping`, *optional*): `NCSNppModel` options that override the published config's.
        use_ema (`bool`, defaults to `True`): the EMA weights (as the published evaluation) or the raw ones.
        torch_dtype (`torch.dtype`): dtype of the converted networks.
        overwrite (`bool`): replace an existing non-empty `output_dir`.

    Returns:
        `(pipeline, info)`: info a dict with `layout`, `config`, `config_inferred`, `step`, the score network's
        `weights`, `ema_decay`, `ema_num_updates`, and `flow` (the flow's info, or None).
    """
    check_choice(config, "config", (*PUBLISHED_CONFIG_NAMES, None))
    check_output_dir(output_dir, overwrite)
    weights = "{k: v for k, v in checkpoint.items() if k in ('model_0', 'model_1', 'ema_0', 'ema_1', 'model', 'ema')}"
    checkpoint = load_checkpoint(checkpoint_path, weights)
    layout = checkpoint_layout(checkpoint)
    model_key, _, flow_key, flow_ema_key = LAYOUTS[layout]
    score_state = strip_module_prefix(checkpoint[model_key])
    inferred = config is None
    if inferred:
        config = infer_published_config(score_state, model_config)
    # the SMLD noise levels (and N) are the checkpoint's: the published code gives them to network and SDE alike
    levels = _noise_levels(score_state)
    network_config = {**NCSNPP_PUBLISHED_CONFIGS[config], **(model_config or {}), **levels}
    unet, info = convert_score_network(checkpoint, layout, network_config, use_ema, torch_dtype)
    scheduler = DiNofScheduler(
        **{
            **DINOF_PUBLISHED_SCHEDULER_CONFIGS[config],
            "num_train_timesteps": levels["num_scales"],
            "sigma_min": levels["sigma_min"],
            "sigma_max": levels["sigma_max"],
        }
    )
    flow_prior, flow_info = None, None
    if flow_key is not None:
        flow_prior, flow_info = convert_flow(
            checkpoint,
            key=flow_key,
            weights="ema" if use_ema else "raw",
            ema_key=flow_ema_key,
            torch_dtype=torch_dtype,
            sample_size=unet.config.sample_size,
            in_channels=unet.config.in_channels,
        )
    pipeline = DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=flow_prior)
    if output_dir is not None:
        save_pretrained_atomically(pipeline, output_dir, overwrite=overwrite)
    step = checkpoint.get("step")
    info.update(layout=layout, config=config, config_inferred=inferred, step=step, flow=flow_info)
    return pipeline, info


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "dinof-convert-checkpoint",
        "Convert a published DiNof checkpoint (score network + flow) or a score_sde_pytorch checkpoint (score "
        "network) to a DiNofPipeline folder.",
        "the pipeline folder",
    )
    parser.add_argument(
        "--config",
        choices=PUBLISHED_CONFIG_NAMES,
        default=None,
        help="the published config the checkpoint was trained with (default: inferred from the state dict)",
    )
    parser.add_argument(
        "--model_config",
        default=None,
        help="a JSON file of NCSNppModel options that override the published config's (another network)",
    )
    parser.add_argument("--no_ema", action="store_true", help="the raw weights instead of the EMA (the default)")
    return add_output_options(parser)


def _read_model_config(path: Optional[str]) -> Optional[Dict[str, Any]]:
    if path is None:
        return None
    try:
        with open(path) as handle:
            options = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model_config {path!r} cannot be read as JSON: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--model_config {path!r} must hold a JSON object of NCSNppModel options.")
    return {key: value for key, value in options.items() if not key.startswith("_")}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `dinof-convert-checkpoint`; returns the exit status (0 on success, 1 on a conversion error)."""
    args = build_parser().parse_args(argv)
    result = run_conversion(
        "dinof-convert-checkpoint",
        args.output_dir,
        lambda: convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            config=args.config,
            model_config=_read_model_config(args.model_config),
            use_ema=not args.no_ema,
            torch_dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
        ),
    )
    if result is None:
        return 1
    pipeline, info = result
    weights = "raw weights"
    if info["weights"] == "ema":
        weights = f"EMA weights (decay {info['ema_decay']}, {info['ema_num_updates']} updates)"
    num_params = sum(p.numel() for p in pipeline.unet.parameters())
    output = os.path.abspath(args.output_dir)
    print(
        f"Converted the {info['layout']} checkpoint (step {info['step']}): {info['config']}"
        f"{' (inferred)' if info['config_inferred'] else ''}, NCSNppModel with {num_params:,} parameters, {weights}"
    )
    if pipeline.flow_prior is None:
        print(
            f"No flow prior: -> {output}. Train one with\n  accelerate launch training_scripts/train.py "
            f"--train_component flow --pretrained_model_name_or_path {output} --dataset_name <data> ..."
        )
    else:
        flow_params = sum(p.numel() for p in pipeline.flow_prior.parameters())
        print(
            f"Flow prior: FlowPriorModel with {flow_params:,} parameters, {info['flow']['weights']} weights -> {output}"
        )
    print(f"Sample with: python training_scripts/sample.py --pipeline {output} --output_dir <folder>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
