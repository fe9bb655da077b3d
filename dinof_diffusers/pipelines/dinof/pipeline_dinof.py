# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""DiNofPipeline: sample x(t*) with the normalizing flow prior, then run the reverse SDE from t* to eps."""

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

from ...hub_utils import is_local_path
from ...models.flow_prior import FlowPriorModel
from ...models.gaussian_prior import GaussianPriorModel
from ...schedulers.scheduling_dinof import DiNofScheduler
from ...validation import check_choice, check_generators, check_number, check_positive_int

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
# Arguments of `from_pretrained` that only concern downloading; they are handed to `snapshot_download`.
_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


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


@dataclass
class DiNofPipelineOutput(BaseOutput):
    """Output of `DiNofPipeline.__call__`.

    Args:
        images (`List[PIL.Image.Image]`, `np.ndarray` of shape `(B, H, W, C)` or `torch.Tensor` of shape
            `(B, C, H, W)`): the samples, in [0, 1].
        nfe (`int`): the number of score-network evaluations made (the flow pass is not counted).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    nfe: int


class DiNofPipeline(DiffusionPipeline):
    """Unconditional image generation with DiNof (Zand et al., TMLR 2024).

    A normalizing flow maps Gaussian noise to a sample of the partially diffused data x(t*), t* = flow_start * T; the
    predictor-corrector sampler of the score SDE then runs only from t* down to eps. Without a flow prior
    (`flow_prior=None` or `use_flow_prior=False`) it is the standard PC sampler from the SDE prior at T.

    Args:
        unet ([`UNet2DModel`]): the score network (or any model with its call, `unet(x, timestep).sample`, and a
            config with `in_channels` and `sample_size`); it returns a score or a noise estimate as the scheduler's
            `prediction_type` says, conditioned on `scheduler.model_timestep(t)`.
        flow_prior ([`FlowPriorModel`] or [`GaussianPriorModel`], *optional*): the prior of x(t*); it always runs in
            float32. A `GaussianPriorModel` must have been fitted for the scheduler's t* and SDE (checked when either
            component is set and at every call).
        scheduler ([`DiNofScheduler`]): the SDE and the PC sampler.
    """

    model_cpu_offload_seq = "flow_prior->unet"
    _optional_components = ["flow_prior"]
    # "latents" is the current sample x of the reverse SDE, "latents_mean" the last update without its noise term.
    _callback_tensor_inputs = ["latents", "latents_mean"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DiNofScheduler,
        flow_prior: Optional[Union[FlowPriorModel, GaussianPriorModel]] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, flow_prior=flow_prior, scheduler=scheduler)

    def __setattr__(self, name, value):
        # construction (register_modules) and later assignment both come through here
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
        the local snapshot is loaded. A name is a folder or a Hub id by the rule of `dinof_diffusers.hub_utils`. The component classes are resolved from `dinof_diffusers`, which this module
        imports.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or a Hub id ("org/name").
            **kwargs: as `DiffusionPipeline.from_pretrained` (e.g. `torch_dtype`, or a component to use instead).

        Returns:
            `DiNofPipeline`.
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if is_local_path(path):
                raise FileNotFoundError(f"{path!r} is neither a folder nor a Hub repository id ('org/name').")
            from huggingface_hub import snapshot_download

            download_kwargs = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
            path = snapshot_download(path, **download_kwargs)
        pipeline = super().from_pretrained(path, **kwargs)
        return pipeline

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

    def _image_shape(self, batch_size: int) -> Tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def _model_output(self, sample: torch.Tensor, model_timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.unet(sample.to(dtype), model_timestep).sample

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
    ) -> Union[DiNofPipelineOutput, Tuple]:
        """Generates images.

        For each t of `scheduler.timesteps` (linspace(t*, eps, int(N * flow_start)) by default): `correct_steps`
        corrector steps, then one predictor step; the output is the last predictor's mean, clamped to the data range
        and mapped to [0, 1].

        Args:
            batch_size (`int`, defaults to 1): B, the number of images.
            num_inference_steps (`int`, *optional*): reverse steps; default int(N * flow_start) with the flow prior,
                N without it. Fewer steps give a coarser grid (see `DiNofScheduler.set_timesteps`).
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

        Returns:
            `DiNofPipelineOutput` or `(images, nfe)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        image_shape = self._image_shape(batch_size) if isinstance(batch_size, int) else None
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
        )
        self._interrupt = False
        device = self._execution_device
        scheduler = self.scheduler

        # 1. the time grid: linspace(t*, eps, n) with the flow prior, linspace(T, eps, n) without
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
                self.flow_prior.to(dtype=torch.float32)
            sample = self.flow_prior.sample(
                batch_size, noise=latents.to(torch.float32), temperature=float(flow_temperature)
            )
            sample = sample.to(device=device, dtype=torch.float32)
        else:
            sample = scheduler.prior_sample(
                image_shape, generator=generator, device=device, dtype=torch.float32, noise=latents
            )
        sample_mean = sample

        # 3. the reverse SDE: for each t, corrector steps, then the predictor
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

        # 4. noise removal: the last mean, clamped to the data range and mapped to [0, 1]
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
