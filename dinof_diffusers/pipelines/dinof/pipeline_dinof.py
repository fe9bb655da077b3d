# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""DiNofPipeline: sample x(t*) with the normalizing flow prior, then run the reverse SDE (or its probability-flow ODE)
from t* to eps; exact likelihoods and the data <-> latents bijection through the ODE."""

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import UNet2DModel
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ...code_bundle import package_model_index, write_code_bundle
from ...file_utils import SWAP_NEW, finish_interrupted_swap
from ...hub_utils import local_folder
from ...models.flow_prior import FlowPriorModel
from ...models.gaussian_prior import GaussianPriorModel
from ...models.ncsnpp import NCSNppModel
from ...schedulers.ode_solvers import check_ode_options, integrate_fixed_steps, integrate_rk45, ode_time_grid
from ...schedulers.scheduling_dinof import DiNofScheduler
from ...validation import check_choice, check_generators, check_number, check_positive_int
from .likelihood import (
    DiNofLikelihoodOutput,
    check_images,
    check_likelihood_options,
    dequantize_images,
    integrate_log_density,
    range_log_det,
)

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
SAMPLERS = ("pc", "ode")
# Arguments of `from_pretrained` that only concern downloading; they are handed to `snapshot_download`.
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def check_scheduler(scheduler) -> None:
    """Raises a `ValueError` unless `scheduler` is a `DiNofScheduler` (or a subclass): DiNof's sampler needs its SDE,
    its predictor-corrector steps and its flow start time, which no other family of schedulers has."""
    # by name: the classes of a bundled copy (save_pretrained(bundle_code=True)) are other objects than the package's
    if scheduler is not None and "DiNofScheduler" not in {klass.__name__ for klass in type(scheduler).__mro__}:
        raise ValueError(
            f"DiNofPipeline needs a DiNofScheduler (the SDE and predictor-corrector sampler DiNof runs from t*), got "
            f"{type(scheduler).__name__}. For other sampler settings use `DiNofScheduler.from_config(pipe.scheduler."
            "config, predictor=..., corrector=...)`."
        )


def check_prior_matches_scheduler(flow_prior, scheduler) -> None:
    """Raises a `ValueError` if a prior that records the marginal it models (a `GaussianPriorModel`: `flow_start`,
    `data_range`, `mean_coeff`, `noise_std` in its config) was fitted for another t* or SDE than the scheduler's.

    A `FlowPriorModel` records none of these and always passes.
    """
    if flow_prior is None or scheduler is None:
        return
    config = getattr(flow_prior, "config", {})
    prior_start = config.get("flow_start")
    if prior_start is None:
        return
    name = type(flow_prior).__name__
    fix = (
        "fit the prior for this scheduler, or change both together (set `pipe.flow_prior = None` first, or build "
        "`DiNofPipeline(unet, scheduler, flow_prior)` anew)."
    )
    if abs(prior_start - scheduler.config.flow_start) > 1e-9:
        raise ValueError(
            f"The {name} models x(t*) at `flow_start`={prior_start}, but the scheduler's `flow_start` is "
            f"{scheduler.config.flow_start}: {fix}"
        )
    if tuple(config.get("data_range", scheduler.data_range)) != tuple(scheduler.data_range):
        raise ValueError(
            f"The {name} was fitted for data in `data_range`={tuple(config['data_range'])}, but the scheduler's "
            f"data range is {tuple(scheduler.data_range)}: {fix}"
        )
    if config.get("mean_coeff") is not None and config.get("noise_std") is not None:
        t = torch.tensor([scheduler.t_star], dtype=torch.float64)
        mean_coeff, noise_std = (float(v[0]) for v in scheduler.marginal_mean_std(t))
        if not (
            np.isclose(config["mean_coeff"], mean_coeff, rtol=1e-5)
            and np.isclose(config["noise_std"], noise_std, rtol=1e-5)
        ):
            raise ValueError(
                f"The {name} was fitted for the marginal x(t*) = {config['mean_coeff']:.6g} x0 + {config['noise_std']:.6g}"
                f" n, but the scheduler's at t* = {scheduler.t_star} is {mean_coeff:.6g} x0 + {noise_std:.6g} n (another"
                f" SDE or noise schedule): {fix}"
            )


def _finish_interrupted_save(folder: str, index_name: str) -> None:
    """Completes a save into `folder` that was killed midway (see `file_utils.swap_folder_contents`), or explains."""
    try:
        done = finish_interrupted_swap(folder, index_name)
    except OSError as error:
        raise OSError(
            f"{folder!r} holds a pipeline whose saving was interrupted (its new version is in "
            f"{os.path.join(folder, SWAP_NEW)!r}), and completing it failed: {error}. Rerun with write access to the "
            "folder (or run train.py with this --output_dir once more)."
        ) from error
    if done:
        logger.warning("%s.", done[0].upper() + done[1:])


def check_unet_matches_scheduler(unet, scheduler) -> None:
    """Raises a `ValueError` if the network expects another conditioning (its class attribute `model_conditioning`,
    e.g. NCSNppModel's "score_sde") than the scheduler's `model_conditioning` gives a discrete model (continuous
    models are conditioned alike under every convention)."""
    expected = getattr(type(unet), "model_conditioning", None)
    if expected is None or scheduler is None or scheduler.config.continuous:
        return
    if scheduler.config.model_conditioning != expected:
        raise ValueError(
            f"{type(unet).__name__} expects the labels of `model_conditioning={expected!r}`, but the scheduler of this "
            f"discrete model has `model_conditioning={scheduler.config.model_conditioning!r}`: use "
            f"`DiNofScheduler.from_config(scheduler.config, model_conditioning={expected!r})`."
        )


@dataclass
class DiNofPipelineOutput(BaseOutput):
    """Output of `DiNofPipeline.__call__`.

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` of shape `(B, H, W, C)` or `torch.Tensor` of shape
            `(B, C, H, W)`): the samples, in [0, 1].
        nfe (`int`): the number of score-network evaluations made (the flow pass is not counted).
    """

    images: Optional[Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]] = None
    nfe: Optional[int] = None


class DiNofPipeline(DiffusionPipeline):
    """Unconditional image generation with DiNof (Zand et al., TMLR 2024).

    A normalizing flow maps Gaussian noise to a sample of the partially diffused data x(t*), t* = flow_start * T; the
    predictor-corrector sampler of the score SDE then runs only from t* down to eps. Without a flow prior
    (`flow_prior=None` or `use_flow_prior=False`) it is the standard PC sampler from the SDE prior at T.

    Continuous-time models also have a deterministic path: `sampler="ode"` integrates the probability-flow ODE
    instead of the reverse SDE; `log_likelihood` gives exact log-densities (bits/dim) through the same ODE and the
    prior's density; `encode` / `decode` map images to the prior's noise and back (flow and ODE are bijections).

    Args:
        unet ([`UNet2DModel`] or [`NCSNppModel`]): the score network (or any model with its call,
            `unet(x, timestep).sample`, and a config with `in_channels` and `sample_size`); it returns a score or a
            noise estimate as the scheduler's `prediction_type` says, conditioned on `scheduler.model_timestep(t)`.
            An `NCSNppModel` of a discrete model needs `model_conditioning="score_sde"` (checked).
        flow_prior ([`FlowPriorModel`] or [`GaussianPriorModel`], *optional*): the prior of x(t*); it always runs in
            float32. A `GaussianPriorModel` must have been fitted for the scheduler's t* and SDE (checked when either
            component is set and at every call). Any model with `sample(batch_size, generator=None, temperature=1.0,
            noise=None)` (`noise`: standard normal of the image shape) and `log_prob(x) -> (B,)` works; `encode` also
            needs the inverse of `sample(noise=...)` at temperature 1: `encode(x)` returning that noise (as
            GaussianPriorModel's), or FlowPriorModel's `encode(x) -> per-level latents` with
            `latents_to_noise(latents)`, the inverse of its `noise_to_latents(noise)`.
        scheduler ([`DiNofScheduler`]): the SDE, the PC sampler and the probability-flow drift.
    """

    model_cpu_offload_seq = "flow_prior->unet"
    _optional_components = ["flow_prior"]
    # "latents" is the current sample x of the reverse SDE, "latents_mean" the last update without its noise term.
    _callback_tensor_inputs = ["latents", "latents_mean"]

    def __init__(
        self,
        unet: Union[UNet2DModel, NCSNppModel],
        scheduler: DiNofScheduler,
        flow_prior: Optional[Union[FlowPriorModel, GaussianPriorModel]] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, flow_prior=flow_prior, scheduler=scheduler)

    def __setattr__(self, name, value):
        # construction (register_modules) and later assignment both come through here
        if name == "scheduler":
            check_scheduler(value)
        if name in ("unet", "scheduler"):
            unet = value if name == "unet" else self.__dict__.get("unet")
            check_unet_matches_scheduler(unet, value if name == "scheduler" else self.__dict__.get("scheduler"))
        if name in ("flow_prior", "scheduler"):
            flow_prior = value if name == "flow_prior" else self.__dict__.get("flow_prior")
            scheduler = value if name == "scheduler" else self.__dict__.get("scheduler")
            check_prior_matches_scheduler(flow_prior, scheduler)
        optional_was_none = name in self._optional_components and self.__dict__.get(name, 0) is None
        super().__setattr__(name, value)
        if optional_was_none and value is not None:
            # diffusers keeps (None, None) in the config when a component that was None is assigned, so that
            # save_pretrained would silently drop it: record the new component's (library, class) instead
            self.register_to_config(**{name: _fetch_class_library_tuple(value)})

    @property
    def num_timesteps(self) -> int:
        """The number of reverse steps of the last call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from a callback) to skip the remaining steps."""
        return self._interrupt

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "DiNofPipeline":
        """Loads a pipeline saved with `save_pretrained`, from a local folder or a Hub repository id.

        diffusers refuses component classes from outside diffusers / transformers when it downloads a repository
        itself (diffusers issue #5553), so a Hub id is first downloaded with `huggingface_hub.snapshot_download`
        (which honours `HF_HUB_OFFLINE`, `cache_dir`, `revision`, `token`, `local_files_only` and `force_download`) and
        the local snapshot is loaded. A name is a folder or a Hub id by the rule of `dinof_diffusers.hub_utils`: a
        mistyped folder is reported as such before the Hub is tried, and a repository that cannot be read as "offline
        / not found". The component classes are resolved from `dinof_diffusers`, which this module imports; a folder
        saved with `bundle_code=True` is loaded with them too, never with its bundled code.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or a Hub id ("org/name").
            **kwargs: as `DiffusionPipeline.from_pretrained` (e.g. `torch_dtype`, or a component to use instead).

        Returns:
            `DiNofPipeline`.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            _finish_interrupted_save(path, cls.config_name)
        else:
            download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
            path = local_folder(path, **download_kwargs)
        for key in ("dtype", "torch_dtype"):  # the flow prior runs in float32 (see `__call__`): load it so
            if isinstance(kwargs.get(key), torch.dtype) and kwargs[key] != torch.float32:
                kwargs[key] = {"default": kwargs[key], "flow_prior": torch.float32}
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # what `from_pretrained` reads model_index.json with: a bundled folder's index names its code files, and is
        # read as the package-based save's, so that the installed package's classes load it
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (package_model_index(loaded[0]), *loaded[1:])
        return package_model_index(loaded)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, bundle_code: bool = False, **kwargs):
        """`DiffusionPipeline.save_pretrained`, and with `bundle_code=True` a self-contained copy.

        The default save names the classes of the installed `dinof_diffusers` in `model_index.json`: loading it needs
        the package (`import dinof_diffusers` first for `DiffusionPipeline.from_pretrained`), and always runs the
        installed code. With `bundle_code=True` the folder also holds the code of the pipeline, the scheduler and the
        prior, generated from this package (`dinof_diffusers.code_bundle`), and `model_index.json` names
        `["pipeline_dinof", "DiNofPipeline"]`, so that `DiffusionPipeline.from_pretrained(folder_or_repo,
        trust_remote_code=True)` loads it where the package is not installed (with `push_to_hub=True`, that copy is
        uploaded). `DiNofPipeline.from_pretrained` still loads such a folder with the installed classes.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            bundle_code (`bool`, defaults to `False`): also write the code (see above).
            *args, **kwargs: as `DiffusionPipeline.save_pretrained` (`safe_serialization`, `variant`, `push_to_hub`,
                `repo_id`, ...).
        """
        self._bundle_code_to = os.fspath(save_directory) if bundle_code else None
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._bundle_code_to = None

    def save_config(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        # save_pretrained writes model_index.json last, before any upload: the code bundle goes in at that point
        super().save_config(save_directory, *args, **kwargs)
        if getattr(self, "_bundle_code_to", None) == os.fspath(save_directory):
            write_code_bundle(self, os.fspath(save_directory))

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: Optional[int],
        generator: Optional[Union[torch.Generator, List[torch.Generator]]],
        latents: Optional[torch.Tensor],
        prior_sample: Optional[torch.Tensor],
        flow_temperature: float,
        use_flow_prior: bool,
        output_type: str,
        image_shape: Optional[Tuple[int, int, int, int]],
        callback_on_step_end_tensor_inputs: List[str],
        sampler: str = "pc",
        ode_solver: str = "heun",
        timestep_spacing: str = "uniform",
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> None:
        """Raises `ValueError` naming the first bad argument of `__call__`, before any work is done."""
        check_positive_int(batch_size, "batch_size")
        check_positive_int(num_inference_steps, "num_inference_steps", allow_none=True)
        check_generators(generator, batch_size)
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        check_number(flow_temperature, "flow_temperature", minimum=0.0, exclusive_minimum=True)
        for name, tensor in (("latents", latents), ("prior_sample", prior_sample)):
            if tensor is not None and tuple(tensor.shape) != tuple(image_shape):
                raise ValueError(f"`{name}` must have shape {tuple(image_shape)}, got {tuple(tensor.shape)}.")
        if latents is not None and prior_sample is not None:
            raise ValueError(
                "Pass at most one of `latents` (noise for the prior) and `prior_sample` (a ready sample)."
            )
        if use_flow_prior and prior_sample is None and self.flow_prior is None:
            raise ValueError(
                "`use_flow_prior=True` needs a `flow_prior` component (or a `prior_sample` at t*); this pipeline has "
                "none: pass `use_flow_prior=False` for the baseline PC sampler."
            )
        if use_flow_prior and prior_sample is None:
            check_prior_matches_scheduler(self.flow_prior, self.scheduler)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
            )
        check_choice(sampler, "sampler", SAMPLERS)
        check_ode_options(ode_solver, timestep_spacing, rtol, atol)
        if sampler == "pc" and timestep_spacing != "uniform":
            raise ValueError("`timestep_spacing` applies to `sampler='ode'` only; the PC sampler's grid is uniform.")
        if sampler == "ode":
            self._check_ode_solver(ode_solver, num_inference_steps, timestep_spacing)

    def _check_continuous(self, what: str) -> None:
        if not self.scheduler.config.continuous:
            raise ValueError(
                f"{what} needs a continuous-time model (`scheduler.config.continuous=True`); this pipeline's model is "
                "discrete (SMLD / DDPM): use the PC sampler."
            )

    def _check_ode_solver(self, ode_solver, num_inference_steps, timestep_spacing):
        self._check_continuous("The probability-flow ODE (`sampler='ode'`)")
        if ode_solver == "rk45" and (num_inference_steps is not None or timestep_spacing != "uniform"):
            raise ValueError(
                "`ode_solver='rk45'` chooses its own steps from `rtol` and `atol`: leave `num_inference_steps` None "
                "and `timestep_spacing` 'uniform' (or use 'heun' / 'euler')."
            )

    def _image_shape(self, batch_size: int) -> Tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def _model_output(self, sample: torch.Tensor, model_timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.unet(sample.to(dtype), model_timestep).sample

    # ------------------------------------------------------------------------------------------------------------------
    # the probability-flow ODE
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _ode_dtype(device: torch.device) -> torch.dtype:
        # the ODE state is float64 as in the published code (tolerances near float32's resolution); MPS has none
        return torch.float32 if torch.device(device).type == "mps" else torch.float64

    def _default_steps(self, use_flow_prior: bool) -> int:
        """The PC sampler's default number of steps: int(N * flow_start) from t*, N from T."""
        return self.scheduler.num_flow_steps if use_flow_prior else self.scheduler.config.num_train_timesteps

    def _probability_flow_drift(self):
        """dx/dt(x, t) = f - 1/2 g^2 score, with one network evaluation (differentiable in x)."""
        unet_dtype = self.unet.dtype  # looked up once: ModelMixin.dtype walks the parameters
        scheduler = self.scheduler

        def drift(x: torch.Tensor, t: float) -> torch.Tensor:
            t64 = torch.tensor(t, dtype=torch.float64)
            model_timestep = scheduler.model_timestep(t64).to(x.device).expand(x.shape[0])
            return scheduler.ode_drift(self._model_output(x, model_timestep, unet_dtype), x, t64)

        return drift

    def _probability_flow(
        self,
        x: torch.Tensor,
        t0: float,
        t1: float,
        ode_solver: str,
        num_inference_steps: Optional[int],
        timestep_spacing: str = "uniform",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=(),
    ) -> Tuple[torch.Tensor, int]:
        """Integrates the probability-flow ODE from x(t0) = x to t1 (backwards to sample, forwards to encode).

        Returns:
            `(x(t1), nfe)`; x keeps its dtype.
        """
        drift = self._probability_flow_drift()
        if ode_solver != "rk45":
            times = ode_time_grid(self.scheduler, num_inference_steps, max(t0, t1), timestep_spacing)
            times = times if t0 > t1 else times.flip(0)
            self._num_timesteps = len(times) - 1
        steps = [0]
        # rk45's number of steps is unknown in advance: its bar shows the percentage of [t1, t0] covered
        total = 100 if ode_solver == "rk45" else len(times) - 1
        with self.progress_bar(total=total) as progress_bar:

            def step_callback(i, t, state):
                steps[0] += 1
                progress_bar.update(100 * abs(t - t0) / abs(t1 - t0) - progress_bar.n if ode_solver == "rk45" else 1)
                if callback_on_step_end is None:
                    return None
                tensors = {"latents": state, "latents_mean": state}
                t = torch.tensor(t, dtype=torch.float64)
                kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, i, t, kwargs)
                return outputs.pop("latents", outputs.pop("latents_mean", None))

            def should_stop():
                return self.interrupt

            if ode_solver == "rk45":
                x, nfe = integrate_rk45(drift, x, t0, t1, rtol, atol, step_callback, should_stop)
                self._num_timesteps = steps[0]
            else:
                x, nfe = integrate_fixed_steps(drift, x, times, ode_solver, step_callback, should_stop)
        return x, nfe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prior_sample: Optional[torch.Tensor] = None,
        flow_temperature: float = 1.0,
        use_flow_prior: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[
                Callable[[DiffusionPipeline, int, torch.Tensor, Dict], Dict], PipelineCallback, MultiPipelineCallbacks
            ]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        sampler: str = "pc",
        ode_solver: str = "heun",
        timestep_spacing: str = "uniform",
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> Union[DiNofPipelineOutput, Tuple]:
        """Generates images.

        `sampler="pc"` (SPEC's algorithm): for each t of `scheduler.timesteps` (linspace(t*, eps, int(N * flow_start))
        by default): `correct_steps` corrector steps, then one predictor step; the output is the last predictor's
        mean. `sampler="ode"` (continuous-time models): the probability-flow ODE dx/dt = f - 1/2 g^2 score from the
        start time down to eps, deterministic given the start; the output is the ODE's state at eps (no noise-removal
        step). Either output is clamped to the data range and mapped to [0, 1]. Output with non-finite values (NaN or
        inf, from a diverged network or prior; they become black pixels) is logged as a warning, once per call.

        Args:
            batch_size (`int`, defaults to 1): B, the number of images (a NumPy integer is accepted).
            num_inference_steps (`int`, *optional*): the reverse steps from the start time: from t* with the flow
                prior (default int(N * flow_start), the spacing of the N noise scales), from T without it (default N).
                So DiNof and the baseline on the same grid take int(K * flow_start) and K steps. Fewer steps give a
                coarser grid; more than the noise scales below the start time raise a `ValueError` (see
                `DiNofScheduler.set_timesteps`). For the ODE the number of heun / euler steps (n + 1 grid points; the
                same default); rk45 chooses its own (leave None).
            generator (`torch.Generator` or a list of B of them, *optional*): the random source of the prior noise
                and of every step (a list gives each sample its own stream).
            latents (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): the standard normal noise of the prior:
                with the flow, its input noise (`flow_prior.sample(noise=latents)`); without it, the noise that
                `scheduler.prior_sample` scales.
            prior_sample (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): a ready sample at the start time (x(t*)
                with `use_flow_prior=True`, x(T) without), used as is; bypasses the flow.
            flow_temperature (`float`, defaults to 1.0): tau, the temperature of the flow's base distributions.
            use_flow_prior (`bool`, defaults to `True`): DiNof (from t*) or the baseline PC sampler (from the SDE prior
                at T).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (`(B, H, W, C)` float32) or `"pt"`
                (`(B, C, H, W)` float32).
            return_dict (`bool`, defaults to `True`): return a `DiNofPipelineOutput` rather than `(images, nfe)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after every reverse step as `callback_on_step_end(self, i, t, callback_kwargs)`; `callback_kwargs`
                holds the tensors named in `callback_on_step_end_tensor_inputs` ("latents": the current x, "latents_mean":
                the last mean), and those it returns replace them.
            callback_on_step_end_tensor_inputs (`List[str]`, defaults to `["latents"]`): see above.
            sampler (`str`, defaults to `"pc"`): `"pc"`, the predictor-corrector sampler of the reverse SDE, or
                `"ode"`, the probability-flow ODE. With the ODE the callback runs after every solver step (i counts
                them, t is the step's end time as a float64 tensor) and "latents" / "latents_mean" are both the
                ODE's state (float64); `interrupt` stops the integration where it is.
            ode_solver (`str`, defaults to `"heun"`): `"heun"` (EDM's second-order steps, the last one Euler:
                NFE 2n - 1), `"euler"` (NFE n) or `"rk45"` (adaptive Dormand-Prince, `rtol` / `atol`).
            timestep_spacing (`str`, defaults to `"uniform"`): the heun / euler grid: `"uniform"` in t (the PC
                sampler's) or `"karras"` (EDM's rho = 7 spacing of the noise level std / mean_coeff: better with few
                steps).
            rtol (`float`, defaults to 1e-5), atol (`float`, defaults to 1e-5): rk45's tolerances (published values).

        Returns:
            `DiNofPipelineOutput` or `(images, nfe)`; `nfe` counts every network evaluation of the sampler.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = check_positive_int(batch_size, "batch_size")  # a Python int from here on (NumPy's too)
        num_inference_steps = check_positive_int(num_inference_steps, "num_inference_steps", allow_none=True)
        image_shape = self._image_shape(batch_size)
        self.check_inputs(
            batch_size,
            num_inference_steps,
            generator,
            latents,
            prior_sample,
            flow_temperature,
            use_flow_prior,
            output_type,
            image_shape,
            callback_on_step_end_tensor_inputs,
            sampler,
            ode_solver,
            timestep_spacing,
            rtol,
            atol,
        )
        self._interrupt = False
        device = self._execution_device
        scheduler = self.scheduler

        # 1. the time grid: linspace(t*, eps, n) with the flow prior, linspace(T, eps, n) without
        if sampler == "pc":
            scheduler.set_timesteps(num_inference_steps, device=device, use_flow_prior=use_flow_prior)
            timesteps = scheduler.timesteps
            self._num_timesteps = len(timesteps)

        # 2. the start: x(t*) from the flow (in float32), or x(T) from the SDE prior; the state stays in float32
        if prior_sample is not None:
            sample = prior_sample.to(device=device, dtype=torch.float32)
        elif use_flow_prior:
            if latents is None:
                latents = randn_tensor(image_shape, generator=generator, device=device, dtype=torch.float32)
            if self.flow_prior.dtype != torch.float32:
                logger.warning("The flow prior runs in float32; casting it from %s.", self.flow_prior.dtype)
                # not ModelMixin.to, which warns about modules "that should be kept in float32" on every cast
                torch.nn.Module.to(self.flow_prior, dtype=torch.float32)
            sample = self.flow_prior.sample(
                batch_size, noise=latents.to(torch.float32), temperature=float(flow_temperature)
            )
            sample = sample.to(device=device, dtype=torch.float32)
        else:
            sample = scheduler.prior_sample(
                image_shape, generator=generator, device=device, dtype=torch.float32, noise=latents
            )
        sample_mean = sample

        # 3. from the start time down to eps: the probability-flow ODE (its state at eps is the output) ...
        if sampler == "ode":
            start = scheduler.t_star if use_flow_prior else scheduler.T
            sample_mean, nfe = self._probability_flow(
                sample.to(self._ode_dtype(device)),
                start,
                scheduler.sampling_eps,
                ode_solver,
                num_inference_steps if num_inference_steps is not None else self._default_steps(use_flow_prior),
                timestep_spacing,
                rtol,
                atol,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
            )
            sample_mean = sample_mean.float()
        else:
            # ... or the reverse SDE: for each t, corrector steps, then the predictor
            unet_dtype = self.unet.dtype  # looked up once: ModelMixin.dtype walks the parameters
            correct_steps = scheduler.config.correct_steps if scheduler.config.corrector != "none" else 0
            use_predictor_model = scheduler.config.predictor != "none"
            nfe = 0
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    model_timestep = scheduler.model_timestep(t).expand(batch_size)

                    for _ in range(correct_steps):
                        model_output = self._model_output(sample, model_timestep, unet_dtype)
                        nfe += 1
                        sample, sample_mean = scheduler.step_correct(
                            model_output, t, sample, generator=generator, return_dict=False
                        )

                    model_output = None
                    if use_predictor_model:
                        model_output = self._model_output(sample, model_timestep, unet_dtype)
                        nfe += 1
                    sample, sample_mean = scheduler.step_pred(
                        model_output, t, sample, generator=generator, return_dict=False
                    )

                    if callback_on_step_end is not None:
                        tensors = {"latents": sample, "latents_mean": sample_mean}
                        callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        sample = callback_outputs.pop("latents", sample)
                        sample_mean = callback_outputs.pop("latents_mean", sample_mean)
                    progress_bar.update()

        # 4. noise removal (PC: the last mean), clamped to the data range and mapped to [0, 1]
        nonfinite = int((~torch.isfinite(sample_mean)).flatten(1).any(dim=1).sum())
        if nonfinite:
            logger.warning(
                "%d of the %d generated images hold non-finite values (NaN or inf), which become black pixels: the "
                "score network or the prior gives non-finite outputs (e.g. weights of a diverged training run).",
                nonfinite,
                batch_size,
            )
        low, high = scheduler.data_range
        image = (sample_mean.clamp(low, high) - low) / (high - low)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, nfe)
        return DiNofPipelineOutput(images=image, nfe=nfe)

    # ------------------------------------------------------------------------------------------------------------------
    # likelihood and the data <-> latents bijection (continuous-time models)
    # ------------------------------------------------------------------------------------------------------------------

    def _check_prior(self, use_flow_prior: bool) -> None:
        if not isinstance(use_flow_prior, bool):
            raise ValueError(f"`use_flow_prior` must be a bool, got {use_flow_prior!r}.")
        if use_flow_prior and self.flow_prior is None:
            raise ValueError("`use_flow_prior=True` needs a `flow_prior` component; pass `use_flow_prior=False`.")

    def _to_data_range(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> the model's data range, in the ODE's dtype on the execution device."""
        device = self._execution_device
        low, high = self.scheduler.data_range
        return low + (high - low) * images.to(device=device, dtype=self._ode_dtype(device))

    def _flow_float32(self):
        if self.flow_prior.dtype != torch.float32:
            logger.warning("The flow prior runs in float32; casting it from %s.", self.flow_prior.dtype)
            self.flow_prior.to(dtype=torch.float32)
        return self.flow_prior

    def log_likelihood(
        self,
        images: torch.Tensor,
        num_bits: Optional[int] = 8,
        dequantize: bool = True,
        use_flow_prior: bool = True,
        trace_estimator: str = "rademacher",
        generator: Optional[torch.Generator] = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        batch_size: Optional[int] = None,
        return_dict: bool = True,
    ) -> Union[DiNofLikelihoodOutput, Tuple]:
        """Exact log-likelihood (and bits/dim) of images under the probability-flow ODE and the prior.

        The images are dequantized ((x (2^b - 1) + u) / 2^b, u ~ U(0, 1), as the published code), mapped to the data
        range (VP / sub-VP: 2x - 1, log-det D ln 2), and carried by the ODE from eps up to t* (the flow prior) or T
        (the SDE prior) with the instantaneous change of variables (see `likelihood.py`); log p = prior log-density
        at the end + the ODE's log-det + the range map's. rk45 (`rtol`, `atol`) integrates each batch; its steps are
        shared by the batch, so a value depends slightly on the batch it was computed in (as published).

        Args:
            images (`torch.Tensor` of shape `(B, C, H, W)`): the model's channels and size, values in [0, 1]
                (`output_type="pt"` images, or a data set's).
            num_bits (`int`, *optional*, defaults to 8): b, the bit depth of the data; `None` for continuous data.
            dequantize (`bool`, defaults to `True`): add uniform dequantization noise (needs `num_bits`).
            use_flow_prior (`bool`, defaults to `True`): the flow prior at t* (DiNof), or the SDE prior at T.
            trace_estimator (`str`, defaults to `"rademacher"`): `"rademacher"` or `"gaussian"` (Hutchinson, one
                probe per image for the whole integration), or `"exact"` (D <= 64 only: analytic models, tests).
            generator (`torch.Generator`, *optional*): the source of the dequantization noise (drawn first, for all
                images) and of the probes (one batch after another).
            rtol (`float`, defaults to 1e-5), atol (`float`, defaults to 1e-5): rk45's tolerances (published).
            batch_size (`int`, *optional*): images per ODE solve; all at once by default.
            return_dict (`bool`, defaults to `True`): return a `DiNofLikelihoodOutput` rather than a tuple.

        Returns:
            `DiNofLikelihoodOutput` or `(log_prob, bits_per_dim, prior_log_prob, delta_log_prob, nfe)`; tensors of
            shape `(B,)`, float64 on the CPU.
        """
        image_shape = self._image_shape(1)[1:]
        check_images(images, image_shape)
        dim = images[0].numel()
        check_likelihood_options(num_bits, dequantize, trace_estimator, generator, batch_size, dim)
        check_ode_options("rk45", "uniform", rtol, atol)
        self._check_continuous("The likelihood")
        self._check_prior(use_flow_prior)
        self._interrupt = False

        scheduler = self.scheduler
        images = dequantize_images(images, num_bits, generator) if dequantize else images
        x = self._to_data_range(images)
        end = scheduler.t_star if use_flow_prior else scheduler.T
        drift = self._probability_flow_drift()
        prior_log_probs, delta_log_probs, nfe = [], [], 0
        chunks = x.split(int(batch_size or len(x)))  # int: a NumPy integer passes the checks too
        with self.progress_bar(total=len(chunks)) as progress_bar:
            for chunk in chunks:
                x_end, delta, chunk_nfe = integrate_log_density(
                    drift, chunk, scheduler.sampling_eps, end, trace_estimator, generator, rtol, atol
                )
                with torch.no_grad():
                    if use_flow_prior:
                        prior = self._flow_float32().log_prob(x_end.to(torch.float32))
                    else:
                        prior = scheduler.prior_log_prob(x_end)
                prior_log_probs.append(prior.detach().to("cpu", torch.float64))
                delta_log_probs.append(delta.detach().to("cpu", torch.float64))
                nfe += chunk_nfe
                progress_bar.update()
        prior_log_prob, delta_log_prob = torch.cat(prior_log_probs), torch.cat(delta_log_probs)
        log_prob = prior_log_prob + delta_log_prob + range_log_det(scheduler.data_range, dim)
        bits_per_dim = -log_prob / (dim * math.log(2.0)) + (num_bits or 0)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (log_prob, bits_per_dim, prior_log_prob, delta_log_prob, nfe)
        return DiNofLikelihoodOutput(
            log_prob=log_prob,
            bits_per_dim=bits_per_dim,
            prior_log_prob=prior_log_prob,
            delta_log_prob=delta_log_prob,
            nfe=nfe,
        )

    def _prior_noise(self, sample: torch.Tensor) -> torch.Tensor:
        """The standard normal noise that `flow_prior.sample(noise=...)` (temperature 1) maps to `sample`."""
        prior = self._flow_float32()
        encoded = prior.encode(sample) if hasattr(prior, "encode") else None
        if isinstance(encoded, torch.Tensor):  # GaussianPriorModel: encode is the inverse of sample(noise=...)
            return encoded
        if encoded is None or not hasattr(prior, "latents_to_noise"):
            raise ValueError(
                f"`encode` needs a prior whose `encode(x)` returns the noise of `sample(noise=...)`, or per-level "
                f"latents with a `latents_to_noise(latents)` (FlowPriorModel); {type(prior).__name__} has neither."
            )
        return prior.latents_to_noise(encoded)

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        use_flow_prior: bool = True,
        ode_solver: str = "rk45",
        num_inference_steps: Optional[int] = None,
        timestep_spacing: str = "uniform",
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> torch.Tensor:
        """Images -> the prior's standard normal noise: the ODE from eps up to t* (or T), then the prior's inverse.

        The inverse of `decode` (to the solver's accuracy; use rk45 with tight tolerances for a close round trip).
        The result is what `__call__(latents=...)` takes: with the flow, the noise that `flow_prior.sample(noise=...)`
        maps to x(t*); without it, x(T) / init_noise_sigma.

        Args:
            images (`torch.Tensor` of shape `(B, C, H, W)`): values in [0, 1], not dequantized.
            use_flow_prior, ode_solver, num_inference_steps, timestep_spacing, rtol, atol: as for `__call__`.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`, float32.
        """
        check_images(images, self._image_shape(1)[1:])
        self._check_prior(use_flow_prior)
        check_ode_options(ode_solver, timestep_spacing, rtol, atol)
        self._check_ode_solver(ode_solver, num_inference_steps, timestep_spacing)
        self._interrupt = False
        scheduler = self.scheduler
        end = scheduler.t_star if use_flow_prior else scheduler.T
        steps = num_inference_steps if num_inference_steps is not None else self._default_steps(use_flow_prior)
        x_end, _ = self._probability_flow(
            self._to_data_range(images), scheduler.sampling_eps, end, ode_solver, steps, timestep_spacing, rtol, atol
        )
        if use_flow_prior:
            noise = self._prior_noise(x_end.to(torch.float32))
        else:
            noise = x_end / scheduler.init_noise_sigma
        return noise.to(torch.float32)

    def decode(
        self,
        latents: torch.Tensor,
        use_flow_prior: bool = True,
        ode_solver: str = "rk45",
        num_inference_steps: Optional[int] = None,
        timestep_spacing: str = "uniform",
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> torch.Tensor:
        """The prior's noise -> images: `__call__(latents=latents, sampler="ode", output_type="pt")`.

        Args:
            latents (`torch.Tensor` of shape `(B, C, H, W)`): standard normal noise (e.g. from `encode`).
            use_flow_prior, ode_solver, num_inference_steps, timestep_spacing, rtol, atol: as for `__call__`.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`, float32 in [0, 1].
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"`latents` must be a tensor of shape {self._image_shape(1)}, got {type(latents)}.")
        return self(
            batch_size=latents.shape[0],
            num_inference_steps=num_inference_steps,
            latents=latents,
            use_flow_prior=use_flow_prior,
            output_type="pt",
            sampler="ode",
            ode_solver=ode_solver,
            timestep_spacing=timestep_spacing,
            rtol=rtol,
            atol=atol,
        ).images
