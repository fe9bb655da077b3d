#!/usr/bin/env python
"""DiNof in the browser: sample a DiNof pipeline, see what it costs beside the baseline, watch x(t*) become an image.

    make app                                            # the pipeline of `make demo` (trained first if missing)
    python app.py --pipeline org/name --port 7860       # any saved DiNofPipeline: a folder or a Hub id
    python app.py --pipeline out --dataset_name cifar10 # also plot the data's x(t*) beside the prior's

A Hugging Face Space runs this file as is (README.md, "The web demo"). Nothing leaves the machine: Gradio's analytics
and version check are off, and the page loads no fonts or scripts from elsewhere.
"""

import argparse
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

# Before gradio is imported: its analytics and its version check (a request to api.gradio.app) read this.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from dinof_diffusers import DiNofPipeline, DiNofScheduler, GaussianPriorModel  # noqa: E402
from dinof_diffusers.hub_utils import is_local_path  # noqa: E402
from dinof_diffusers.image_utils import image_grid  # noqa: E402
from dinof_diffusers.schedulers.scheduling_dinof import LANGEVIN_NORMS  # noqa: E402
from dinof_diffusers.validation import check_choice, check_int, check_number  # noqa: E402

TITLE = "DiNof: diffusion from a normalizing-flow prior"
DEFAULT_PIPELINE = os.environ.get("DINOF_PIPELINE", "outputs/demo/pipeline")
MAX_IMAGES = 64
MAX_TEMPERATURE = 2.0
DEFAULT_STEPS = 100  # N of a click (the published N is 1000; the demo's digits look alike from N = 100 up)
NUM_TRAJECTORY_FRAMES = 6  # x at t_start, then states down to eps; the output is added after them
NUM_REFERENCE_IMAGES = 1000  # data images whose x(t*) the histogram shows
SEED_MAX = 2**63 - 1
DATASET_AUTO, DATASET_DIGITS, DATASET_NONE = "auto", "digits", "none"

# ----------------------------------------------------------------------------------------------------------------------
# What the app offers. Each sampler runs from a prior of x(t*) ("DiNof") or from the SDE prior at T ("baseline"); a
# solver is the `DiNofPipeline.__call__` keyword arguments that select it (one entry each in SOLVERS).
# ----------------------------------------------------------------------------------------------------------------------


def pc_state_time(pipeline: DiNofPipeline, i: int, t: torch.Tensor) -> float:
    """The time of the PC sampler's state after its step i: the next grid point (0, the data, after the last)."""
    grid = pipeline.scheduler.timesteps
    return float(grid[i + 1]) if i + 1 < len(grid) else 0.0


def ode_state_time(pipeline: DiNofPipeline, i: int, t: torch.Tensor) -> float:
    """The ODE's callback receives the time its state has reached."""
    return float(t)


@dataclass(frozen=True)
class Solver:
    """A reverse-process solver of the page.

    Args:
        call_kwargs (`Dict`): the `DiNofPipeline.__call__` keyword arguments that select it.
        uses_steps (`bool`, defaults to `True`): `False` for adaptive solvers (N does not apply; the pipeline chooses).
        state_time (`Callable[[DiNofPipeline, int, torch.Tensor], float]`): the time of the state that
            `callback_on_step_end(pipeline, i, t, ...)` receives.
        continuous_only (`bool`, defaults to `False`): offered for continuous-time models only (the ODE).
    """

    call_kwargs: Dict = field(default_factory=dict)
    uses_steps: bool = True
    state_time: Callable[[DiNofPipeline, int, torch.Tensor], float] = pc_state_time
    continuous_only: bool = False


def _ode(ode_solver: str, **kwargs) -> Solver:
    return Solver(
        {"sampler": "ode", "ode_solver": ode_solver, **kwargs},
        uses_steps=ode_solver != "rk45",
        state_time=ode_state_time,
        continuous_only=True,
    )


SOLVERS: Dict[str, Solver] = {
    "PC": Solver(),
    "ODE Heun": _ode("heun"),
    "ODE Heun, Karras grid": _ode("heun", timestep_spacing="karras"),
    "ODE Euler": _ode("euler"),
    "ODE RK45 (adaptive)": _ode("rk45"),
}
STARTS = {"DiNof": True, "baseline": False}  # the label -> `use_flow_prior`


def prior_label(model: torch.nn.Module) -> str:
    """How a prior of x(t*) is named in the page: "flow" for FlowPriorModel, "gaussian" for GaussianPriorModel."""
    name = type(model).__name__
    return {"FlowPriorModel": "flow", "GaussianPriorModel": "gaussian"}.get(name, name)


def available_priors(pipeline: DiNofPipeline, data: Optional[torch.Tensor] = None) -> Dict[str, torch.nn.Module]:
    """The priors of x(t*) the page offers, by label: the pipeline's own `flow_prior` component, if any, and, when the
    training data are known, the moment-matched Gaussian of their x(t*) (GaussianPriorModel, fitted in closed form
    here: the control that shows what the flow adds).

    Any prior with FlowPriorModel's `sample(batch_size, noise=..., temperature=...)` works.

    Args:
        pipeline (`DiNofPipeline`): the loaded pipeline.
        data (`torch.Tensor` of shape `(M, C, H, W)`, *optional*): training images in the model's data range.
    """
    priors = {}
    if pipeline.flow_prior is not None:
        priors[prior_label(pipeline.flow_prior)] = pipeline.flow_prior
    if data is not None and "gaussian" not in priors:
        gaussian = GaussianPriorModel.fit(data, pipeline.scheduler, show_progress=False)
        priors["gaussian"] = gaussian.to(pipeline.device)
    return priors


# ----------------------------------------------------------------------------------------------------------------------
# The sampling (no Gradio here: the tests call it directly)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One picture of the trajectory of the first image: x at time t (None for the output), its marginal std."""

    label: str
    image: torch.Tensor  # (C, H, W), in the model's data space
    t: Optional[float] = None
    sigma: Optional[float] = None


@dataclass
class Run:
    """One measured pipeline call."""

    name: str
    start: str
    num_steps: Optional[int]
    nfe: int
    seconds: float


@dataclass
class DemoResult:
    """What one click produces.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): the samples in [0, 1].
        runs (`List[Run]`): this call first, then the baseline at the same N (absent when this call is the baseline).
        frames (`List[Frame]`): the trajectory of the first image, from the start to the output.
        start_time (`float`): t* (or T for a baseline sampler).
        x_t_star (`torch.Tensor` of shape `(B, C, H, W)`): the prior's x(t*), or the baseline's state at the grid
            point nearest t*: what the histogram compares with the data's x(t*).
        x_t_star_label (`str`): what `x_t_star` is, for the plot's legend.
        warnings (`List[str]`): settings that had no effect, shown to the user.
    """

    images: torch.Tensor
    runs: List[Run]
    frames: List[Frame]
    start_time: float
    x_t_star: torch.Tensor
    x_t_star_label: str
    warnings: List[str] = field(default_factory=list)


def _check_int_in(value, name: str, low: int, high: int) -> int:
    """An integer in [low, high], with the package's wording."""
    return int(check_number(check_int(value, name, minimum=low), name, minimum=low, maximum=high))


class DiNofDemo:
    """A loaded DiNof pipeline and what the page needs to sample and explain it.

    Args:
        pipeline (`DiNofPipeline`): loaded once; every click uses its networks with a scheduler of its own.
        data (`torch.Tensor` of shape `(M, C, H, W)`, *optional*): images of the training data set in the model's data
            range; with them, the histogram of the data's x(t*) is drawn beside the prior's.
        data_name (`str`, *optional*): the data set's name, for the page.
        score_trained_to_T (`bool`, *optional*): whether the score network learnt the whole time range (from the
            model card); `False` adds a warning to baseline runs (their network never saw t > t*).
        name (`str`, *optional*): where the pipeline came from, for the page.
    """

    def __init__(
        self,
        pipeline: DiNofPipeline,
        data: Optional[torch.Tensor] = None,
        data_name: Optional[str] = None,
        score_trained_to_T: Optional[bool] = None,
        name: str = "",
    ):
        self.pipeline = pipeline
        self.scheduler_config = pipeline.scheduler.config
        # for the SDE's quantities only; every run samples with a scheduler of its own
        self._scheduler = scheduler = DiNofScheduler.from_config(self.scheduler_config)
        self.t_star = scheduler.t_star
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.num_flow_steps = scheduler.num_flow_steps
        self.data_range = scheduler.data_range
        self.data_name = data_name
        self.score_trained_to_T = score_trained_to_T
        self.name = name
        self.priors = available_priors(pipeline, data)
        starts = [label for label, from_t_star in STARTS.items() if self.priors or not from_t_star]
        solvers = {
            name: solver
            for name, solver in SOLVERS.items()
            if scheduler.config.continuous or not solver.continuous_only
        }
        self.samplers = {
            f"{start} {name}": (STARTS[start], solver) for start in starts for name, solver in solvers.items()
        }
        self.data_x_t_star = None
        if data is not None:
            # The data's x(t*): fixed noise, so that every click compares against the same sample.
            generator = torch.Generator().manual_seed(0)
            noise = torch.randn(data.shape, generator=generator)
            t = torch.full((data.shape[0],), self.t_star, dtype=torch.float64)
            self.data_x_t_star = scheduler.add_noise(data.double(), noise.double(), t).float()

    # -- what the page shows about the model -----------------------------------------------------------------------

    def sigma(self, t: float) -> float:
        """The marginal standard deviation of x(t) (VE: sigma(t); VP / sub-VP: the std of the noise term)."""
        return float(self._scheduler.marginal_mean_std(torch.tensor([t], dtype=torch.float64))[1][0])

    def describe(self) -> str:
        """A markdown line about the loaded pipeline."""
        config = self.pipeline.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else "x".join(map(str, config.sample_size))
        unet_params = sum(p.numel() for p in self.pipeline.unet.parameters())
        sizes = {label: sum(p.numel() for p in model.parameters()) for label, model in self.priors.items()}
        prior_text = ", ".join(
            f"{label} ({f'{size / 1e3:.0f}k parameters' if size else 'closed form'})" for label, size in sizes.items()
        )
        return (
            f"**Pipeline** `{self.name or 'in memory'}`: {self.scheduler_config.sde_type.upper()} SDE, "
            f"N = {self.num_train_timesteps} noise scales, t* = {self.t_star:g} (σ(t*) = {self.sigma(self.t_star):.3g}), "
            f"{config.in_channels}x{size}x{size} images; score network {unet_params / 1e6:.2f}M parameters; "
            f"prior of x(t*): {prior_text or 'none (baseline sampler only)'}; "
            f"data set: {self.data_name or 'not known (start with --dataset_name for the x(t*) histogram)'}."
        )

    # -- sampling ----------------------------------------------------------------------------------------------------

    def check_inputs(self, num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior):
        """Validates a click's settings before any work; returns them normalised. Raises `ValueError`."""
        num_images = _check_int_in(num_images, "num_images", 1, MAX_IMAGES)
        seed = _check_int_in(seed, "seed", 0, SEED_MAX)
        check_choice(sampler, "sampler", self.samplers)
        num_steps = _check_int_in(num_steps, "num_steps", 1, self.num_train_timesteps)
        check_number(flow_temperature, "flow_temperature", 0.0, MAX_TEMPERATURE, exclusive_minimum=True)
        langevin_norm = self.scheduler_config.langevin_norm if langevin_norm is None else langevin_norm
        check_choice(langevin_norm, "langevin_norm", LANGEVIN_NORMS)
        if self.samplers[sampler][0]:  # from a prior at t*
            prior = next(iter(self.priors)) if prior is None else check_choice(prior, "prior", self.priors)
        return num_images, seed, sampler, num_steps, float(flow_temperature), langevin_norm, prior

    def steps_from(self, num_steps: int, from_t_star: bool) -> int:
        """The reverse steps of a run at N = `num_steps`: DiNof takes the part of the N-point grid below t*."""
        if not from_t_star:
            return num_steps
        return min(self.num_flow_steps, max(1, round(num_steps * self.t_star)))

    def sample(
        self,
        num_images: int = 16,
        seed: int = 0,
        sampler: Optional[str] = None,
        num_steps: int = DEFAULT_STEPS,
        flow_temperature: float = 1.0,
        langevin_norm: Optional[str] = None,
        prior: Optional[str] = None,
        progress: Optional[Callable[[int, Optional[int], str], None]] = None,
    ) -> DemoResult:
        """Samples `num_images` images with `sampler` and measures the baseline at the same N beside it.

        Args:
            num_images (`int`): B, in [1, MAX_IMAGES].
            seed (`int`): seeds the noise of the prior and of every step (the same for both runs).
            sampler (`str`, *optional*): a key of `self.samplers` ("DiNof PC", "baseline PC", ...); default the first.
            num_steps (`int`): N, the number of points of the time grid over [eps, T]; DiNof runs the
                round(N t*) of them below t*, the baseline all N (the published N is 1000: 600 and 1000 steps).
            flow_temperature (`float`): the temperature of the prior at t*, in (0, MAX_TEMPERATURE].
            langevin_norm (`str`, *optional*): "batch" (published) or "sample", the Langevin corrector's step-size
                norm; default the pipeline scheduler's.
            prior (`str`, *optional*): a key of `self.priors`; default the first.
            progress (`Callable[[int, Optional[int], str], None]`, *optional*): called after every step of each run
                with (steps done, the run's steps or None when unknown, the run's name).

        Returns:
            `DemoResult`.
        """
        sampler = sampler if sampler is not None else next(iter(self.samplers))
        num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior = self.check_inputs(
            num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior
        )
        from_t_star, solver = self.samplers[sampler]
        solver_name = sampler.split(" ", 1)[1]
        runs = [(sampler, from_t_star)]
        if from_t_star:
            runs.append((f"baseline {solver_name}", False))
        scheduler = DiNofScheduler.from_config(self.scheduler_config, langevin_norm=langevin_norm)

        warnings = []
        if not from_t_star and flow_temperature != 1.0:
            warnings.append("The flow temperature has no effect on a baseline sampler: it starts from the SDE prior.")
        if langevin_norm != self.scheduler_config.langevin_norm and (
            scheduler.config.corrector != "langevin" or solver.call_kwargs.get("sampler", "pc") != "pc"
        ):
            warnings.append("`langevin_norm` only changes the Langevin corrector of the PC sampler; not used here.")
        if self.score_trained_to_T is False:
            warnings.append(
                "This score network learnt t <= t* only: the baseline (from T) runs for its cost, its images mean little."
            )

        results = []
        for name, start in runs:
            n = self.steps_from(num_steps, start) if solver.uses_steps else None
            report = None if progress is None else (lambda done, total, name=name: progress(done, total, name))
            shown = not results
            results.append(
                self._run(name, start, solver, scheduler, num_images, seed, n, flow_temperature, prior, shown, report)
            )
        run, images, frames, x_t_star, x_t_star_label = results[0]
        return DemoResult(
            images=images,
            runs=[result[0] for result in results],
            frames=frames,
            start_time=self.t_star if from_t_star else 1.0,
            x_t_star=x_t_star,
            x_t_star_label=x_t_star_label,
            warnings=warnings,
        )

    @torch.no_grad()
    def _run(
        self, name, from_t_star, solver, scheduler, batch_size, seed, num_steps, temperature, prior, record, step
    ):
        """One timed pipeline call; with `record`, the first image's trajectory and the batch's x near t* as well."""
        pipeline = DiNofPipeline(
            **{**self.pipeline.components, "scheduler": DiNofScheduler.from_config(scheduler.config)}
        )
        pipeline.set_progress_bar_config(disable=True)
        device = pipeline._execution_device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        config = pipeline.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, config.in_channels, height, width)

        start = time.perf_counter()
        # The start drawn here as the pipeline itself draws it (same generator calls, so the same images as a plain
        # `pipeline(generator=...)`), to show it: the prior's x(t*), or the SDE prior's x(T).
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if from_t_star:
            prior_model = self.priors[prior]
            start_sample = prior_model.sample(batch_size, noise=latents, temperature=temperature)
            start_name = f"{prior} prior at t* = {self.t_star:g}"
        else:
            start_sample = pipeline.scheduler.prior_sample(shape, device=device, noise=latents)
            start_name = "SDE prior at T = 1"
        start_sample = start_sample.to(device=device, dtype=torch.float32)

        start_time = self.t_star if from_t_star else 1.0
        eps = scheduler.sampling_eps
        # The trajectory: the first state at or below each of these times (evenly spaced from the start to eps).
        targets = np.linspace(start_time, eps, NUM_TRAJECTORY_FRAMES)[1:].tolist() if record else []
        frames, near_t_star, steps_done = [], {}, [0]
        if record:
            frames.append(Frame(f"x({'t*' if from_t_star else 'T'})", start_sample[0].cpu(), start_time))

        def callback(pipe, i, t, callback_kwargs):
            steps_done[0] += 1
            if record:
                state, time_point = callback_kwargs["latents"], solver.state_time(pipe, i, t)
                tolerance = 1e-6 * start_time  # the grids are stored in float32
                if targets and time_point <= targets[0] + tolerance:
                    frames.append(Frame("x(t)", state[0].float().cpu(), time_point))
                    while targets and time_point <= targets[0] + tolerance:
                        targets.pop(0)
                distance = abs(time_point - self.t_star)  # the baseline's state nearest t*, for the histogram
                if not from_t_star and distance < near_t_star.get("distance", math.inf):
                    near_t_star.update(x=state.float().cpu().clone(), t=time_point, distance=distance)
            if step is not None:
                step(steps_done[0], getattr(pipe, "_num_timesteps", None))
            return {}

        output = pipeline(
            batch_size=batch_size,
            num_inference_steps=num_steps,
            generator=generator,
            prior_sample=start_sample,
            use_flow_prior=from_t_star,
            output_type="pt",
            callback_on_step_end=callback,
            **solver.call_kwargs,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        run = Run(name=name, start=start_name, num_steps=num_steps, nfe=output.nfe, seconds=seconds)
        if not record:
            return run, None, None, None, None

        low, high = self.data_range
        ending = "noise removed" if solver.call_kwargs.get("sampler", "pc") == "pc" else "x(eps), clamped"
        frames.append(Frame(f"output\n({ending})", output.images[0].cpu() * (high - low) + low))
        for frame in frames:
            if frame.t is not None:
                frame.sigma = self.sigma(frame.t)
        if from_t_star:
            x_t_star, label = start_sample.cpu(), f"{prior} prior's x(t*), this batch"
        elif "x" in near_t_star:
            x_t_star = near_t_star["x"]
            label = f"baseline's x(t = {near_t_star['t']:.3g}) after its steps from T, this batch"
        else:
            x_t_star, label = start_sample.cpu(), "baseline's x(T), this batch"
        return run, output.images.cpu(), frames, x_t_star, label


# ----------------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------------


def _figure_to_image(figure: Figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def samples_picture(images: torch.Tensor, max_width: int = 640) -> Image.Image:
    """The samples as one grid, upscaled (nearest neighbour) so that small images stay crisp."""
    columns = math.ceil(math.sqrt(images.shape[0]))
    scale = max(1, min(16, max_width // (columns * images.shape[-1])))
    return image_grid(images, scale=scale).convert("RGB")


def trajectory_picture(frames: List[Frame], data_range: Tuple[float, float]) -> Image.Image:
    """The frames side by side, each titled with its t and sigma(t); values clamped to the data range."""
    low, high = data_range
    figure = Figure(figsize=(1.45 * len(frames), 2.1))
    for k, frame in enumerate(frames):
        axis = figure.add_subplot(1, len(frames), k + 1)
        image = ((frame.image.float().clamp(low, high) - low) / (high - low)).permute(1, 2, 0).numpy()
        if image.shape[-1] == 1:
            axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        if frame.t is None:
            axis.set_title(f"{frame.label}\n", fontsize=9)
        else:
            axis.set_title(f"{frame.label}\nt = {frame.t:.3g}\nσ(t) = {frame.sigma:.3g}", fontsize=9)
    return _figure_to_image(figure)


def histogram_picture(data_x: torch.Tensor, model_x: torch.Tensor, model_label: str, t_star: float, sigma: float):
    """Pixel histograms of the data's x(t*) and of the prior's x(t*), densities on one axis."""
    data_values = data_x.flatten().numpy()
    model_values = model_x.float().flatten().numpy()
    low = min(np.percentile(data_values, 0.1), np.percentile(model_values, 0.1))
    high = max(np.percentile(data_values, 99.9), np.percentile(model_values, 99.9))
    bins = np.linspace(low, high, 60)
    figure = Figure(figsize=(7.5, 3.0))
    axis = figure.add_subplot(1, 1, 1)
    axis.hist(
        data_values, bins=bins, density=True, color="#9ca3af", alpha=0.7, label=_stats_label("data", data_values)
    )
    model_label = _stats_label(model_label, model_values)
    axis.hist(model_values, bins=bins, density=True, histtype="step", linewidth=2, color="#ea580c", label=model_label)
    axis.set_xlabel("pixel value of x(t*)")
    axis.set_ylabel("density")
    axis.set_title(f"Pixel values of x(t*), t* = {t_star:g}, σ(t*) = {sigma:.3g}", fontsize=10)
    axis.set_ylim(top=axis.get_ylim()[1] * 1.3)  # room for the legend above the bars
    axis.legend(fontsize=8, loc="upper left", frameon=False)
    figure.tight_layout()
    return _figure_to_image(figure)


def _stats_label(name, values):
    return f"{name} (mean {values.mean():.3g}, std {values.std():.3g})"


def cost_table(runs: List[Run]) -> str:
    """The runs as a markdown table (the first is the one shown), with the ratios when the baseline ran too."""
    lines = ["| run | starts from | steps | NFE | wall time |", "|---|---|---:|---:|---:|"]
    for k, run in enumerate(runs):
        name = f"**{run.name}** (shown)" if k == 0 else run.name
        steps = "adaptive" if run.num_steps is None else str(run.num_steps)
        lines.append(f"| {name} | {run.start} | {steps} | {run.nfe} | {run.seconds:.2f} s |")
    if len(runs) == 2 and runs[1].nfe and runs[1].seconds > 0:
        nfe_ratio, time_ratio = runs[0].nfe / runs[1].nfe, runs[0].seconds / runs[1].seconds
        lines.append(f"| ratio, shown / baseline | | | {nfe_ratio:.2f} | {time_ratio:.2f} |")
    lines.append("")
    lines.append(
        "NFE: score-network evaluations per image (the prior's pass is not counted); both runs measured here."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------------

INTRO = (
    "DiNof (Zand, Etemad & Greenspan, TMLR 2024) stops the forward diffusion at t* and learns a normalizing flow of the "
    "partly noisy data x(t*). Sampling draws x(t*) from the flow and runs the reverse SDE only from t* down to eps: "
    "a fraction t* of the baseline's steps, which start from pure noise at T. Pick a sampler and a seed, press "
    "**Sample**, and compare the cost with the baseline's, measured at the same N."
)

CSS = """
#samples img { image-rendering: pixelated; }
"""


def pictures(demo: DiNofDemo, result: DemoResult) -> Tuple[Image.Image, str, Image.Image, Optional[Image.Image]]:
    """The page's outputs for one result: samples, cost table, trajectory, x(t*) histogram (None without data)."""
    histogram = None
    if demo.data_x_t_star is not None:
        histogram = histogram_picture(
            demo.data_x_t_star, result.x_t_star, result.x_t_star_label, demo.t_star, demo.sigma(demo.t_star)
        )
    trajectory = trajectory_picture(result.frames, demo.data_range)
    return samples_picture(result.images), cost_table(result.runs), trajectory, histogram


def build_app(demo: DiNofDemo, first_sample: bool = True, settings: Optional[Dict] = None) -> gr.Blocks:
    """The Gradio page around `demo`; one click at a time (the pipeline's scheduler holds the state of a run).

    Args:
        demo (`DiNofDemo`): the loaded pipeline.
        first_sample (`bool`, defaults to `True`): sample once with the initial settings now, so that the page opens
            with results rather than empty boxes.
        settings (`Dict`, *optional*): initial settings instead of the defaults, by `DiNofDemo.sample` argument name.
    """
    sampler_choices = list(demo.samplers)
    prior_choices = list(demo.priors)
    defaults = {
        "num_images": 16,
        "seed": 0,
        "sampler": sampler_choices[0],
        "num_steps": min(DEFAULT_STEPS, demo.num_train_timesteps),
        "flow_temperature": 1.0,
        "langevin_norm": demo.scheduler_config.langevin_norm,
        "prior": prior_choices[0] if prior_choices else None,
        **(settings or {}),
    }
    shown = pictures(demo, demo.sample(**defaults)) if first_sample else (None, None, None, None)

    def on_click(num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior, progress=gr.Progress()):
        def report(done, total, description):
            progress((done, total) if total else None, desc=description, unit="steps")

        try:
            result = demo.sample(
                num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior, progress=report
            )
        except ValueError as error:  # bad settings: a message in the page, not a traceback
            raise gr.Error(str(error), print_exception=False) from None
        for warning in result.warnings:
            gr.Warning(warning)
        return pictures(demo, result)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\n{INTRO}\n\n{demo.describe()}")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                num_images = gr.Slider(1, MAX_IMAGES, value=defaults["num_images"], step=1, label="Number of images")
                seed = gr.Number(value=defaults["seed"], precision=0, label="Seed")
                sampler = gr.Dropdown(
                    sampler_choices,
                    value=defaults["sampler"],
                    label="Sampler",
                    info="DiNof: the prior at t*, then the reverse process; baseline: from the SDE prior at T. "
                    "PC: the reverse SDE (predictor-corrector); ODE: the deterministic probability-flow ODE.",
                )
                prior = gr.Radio(
                    prior_choices,
                    value=defaults["prior"],
                    label="Prior at t*",
                    info="flow: the pipeline's; gaussian: the data's x(t*) moment-matched (the control). DiNof only.",
                    visible=len(prior_choices) > 1,
                )
                num_steps = gr.Slider(
                    1,
                    demo.num_train_timesteps,
                    value=defaults["num_steps"],
                    step=1,
                    label="Number of steps N",
                    info=f"Grid points over [eps, T]; DiNof runs the {demo.t_star:g} N of them below t* "
                    "(RK45 picks its own).",
                )
                flow_temperature = gr.Slider(
                    0.05,
                    MAX_TEMPERATURE,
                    value=defaults["flow_temperature"],
                    step=0.05,
                    label="Flow temperature",
                    info="τ of the prior at t*.",
                )
                langevin_norm = gr.Radio(
                    list(LANGEVIN_NORMS),
                    value=defaults["langevin_norm"],
                    label="langevin_norm",
                    info="batch (published): step size from batch-mean norms; sample: per image, batch-independent.",
                )
                button = gr.Button("Sample", variant="primary", elem_id="sample-button")
            with gr.Column(scale=2):
                samples = gr.Image(shown[0], label="Samples", type="pil", format="png", elem_id="samples", height=480)
                cost = gr.Markdown(
                    shown[1] or "Press **Sample**: the cost of this call and the baseline's appear here."
                )
        gr.Markdown("### Trajectory of the first image\nx(t*) from the prior, then the reverse process down to eps.")
        trajectory = gr.Image(shown[2], show_label=False, type="pil", format="png", elem_id="trajectory")
        with gr.Column(visible=demo.data_x_t_star is not None):
            gr.Markdown(
                f"### The prior's x(t*) against the data's\nPixel histograms; the data: {demo.data_name}, noised to t*. "
                "The closer the two, the less the reverse process has to correct."
            )
            histogram = gr.Image(shown[3], show_label=False, type="pil", format="png")
        button.click(
            on_click,
            inputs=[num_images, seed, sampler, num_steps, flow_temperature, langevin_norm, prior],
            outputs=[samples, cost, trajectory, histogram],
            api_name="sample",
            concurrency_limit=1,
        )
    blocks.queue(default_concurrency_limit=1)
    return blocks


def launch(blocks: gr.Blocks, host: Optional[str] = None, port: Optional[int] = None, **kwargs):
    """Serves the page; `host` / `port` None leave Gradio's defaults (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT)."""
    return blocks.launch(server_name=host, server_port=port, css=CSS, share=False, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Loading: the pipeline and, where known, its data set
# ----------------------------------------------------------------------------------------------------------------------


def read_model_card(pipeline_dir: str) -> Tuple[Optional[str], Optional[bool]]:
    """(data set description, whether the score network learnt [eps, T]) from the card train.py writes, if any."""
    path = os.path.join(pipeline_dir, "README.md")
    if not os.path.isfile(path):
        return None, None
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    dataset = re.search(r"^Data set: (.+)\.$", text, flags=re.MULTILINE)
    time_range = re.search(r"^score_time_range: '?([^'\n]+)'?$", text, flags=re.MULTILINE)
    return (
        dataset.group(1) if dataset else None,
        None if time_range is None else time_range.group(1).strip() == "[eps, T]",
    )


def load_reference_images(
    dataset_name: str, resolution: int, channels: int, data_range: Tuple[float, float], image_column: str = "image"
) -> torch.Tensor:
    """Up to NUM_REFERENCE_IMAGES training images, resized and center-cropped as train.py does, in the data range.

    Args:
        dataset_name (`str`): "digits" (scikit-learn's, embedded), or a `datasets` name / folder (its "train" split).

    Returns:
        `torch.Tensor` of shape `(M, channels, resolution, resolution)`.
    """
    from torchvision import transforms

    if dataset_name == DATASET_DIGITS:
        from dinof_diffusers.data import load_digits_dataset

        dataset = load_digits_dataset(resolution=resolution)
    else:
        from datasets import load_dataset

        dataset = load_dataset(dataset_name, split="train")
    if image_column not in dataset.column_names:
        raise ValueError(f"--image_column {image_column!r} is not a column of {dataset_name}: {dataset.column_names}.")
    dataset = dataset.select(range(min(len(dataset), NUM_REFERENCE_IMAGES)))
    transform = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
        ]
    )
    mode = "L" if channels == 1 else "RGB"
    images = torch.stack([transform(image.convert(mode)) for image in dataset[image_column]])
    low, high = data_range
    return images * (high - low) + low


def load_demo(
    pipeline_name: str, dataset_name: str = DATASET_AUTO, image_column: str = "image", device: Optional[str] = None
) -> DiNofDemo:
    """Loads the pipeline once (a folder or a Hub id) and, where known, its data set's images."""
    if is_local_path(pipeline_name) and not os.path.isfile(os.path.join(pipeline_name, "model_index.json")):
        what = "holds no model_index.json" if os.path.isdir(pipeline_name) else "does not exist"
        hint = " (`make app` trains it first)" if pipeline_name == DEFAULT_PIPELINE else ""
        raise FileNotFoundError(f"--pipeline {pipeline_name!r} {what}: not a saved DiNofPipeline{hint}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DiNofPipeline.from_pretrained(pipeline_name).to(device)
    pipeline.set_progress_bar_config(disable=True)
    local_dir = pipeline.config.get("_name_or_path") or pipeline_name
    card_dataset, score_trained_to_T = read_model_card(local_dir)
    if dataset_name == DATASET_AUTO:
        digits = card_dataset is not None and "scikit-learn handwritten digits" in card_dataset
        dataset_name = DATASET_DIGITS if digits else DATASET_NONE
    data = None
    if dataset_name != DATASET_NONE:
        config = pipeline.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        data = load_reference_images(
            dataset_name, size, config.in_channels, pipeline.scheduler.data_range, image_column=image_column
        )
    data_name = {DATASET_DIGITS: "scikit-learn digits (embedded)", DATASET_NONE: None}.get(dataset_name, dataset_name)
    return DiNofDemo(
        pipeline, data=data, data_name=data_name, score_trained_to_T=score_trained_to_T, name=pipeline_name
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        help="A saved DiNofPipeline: folder or Hub id (default: $DINOF_PIPELINE, else outputs/demo/pipeline).",
    )
    parser.add_argument(
        "--dataset_name",
        default=DATASET_AUTO,
        help="The training data, for the x(t*) histogram: 'digits' (embedded), a `datasets` name or folder, 'none'; "
        "'auto' (default): the digits when the pipeline's model card says it was trained on them, else none.",
    )
    parser.add_argument("--image_column", default="image", help="The image column of --dataset_name.")
    parser.add_argument("--host", default=None, help="Address to bind (default: Gradio's, 127.0.0.1).")
    parser.add_argument(
        "--port", type=int, default=None, help="Port (default: Gradio's, $GRADIO_SERVER_PORT or 7860)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    args = parser.parse_args(argv)
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        demo = load_demo(args.pipeline, args.dataset_name, args.image_column, args.device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"app.py: {error}") from None
    launch(build_app(demo), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
