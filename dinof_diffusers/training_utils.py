"""DiNof training: the two losses, and the checkpoint and output handling the training script shares.

Losses (SPEC.md, "DiNof training"):

- `score_matching_loss`: denoising score matching on t ~ U(eps, T) * flow_start, so the score network only learns
  the noise levels below t* that the DiNof sampler visits. With the scheduler's marginals and conditioning the same
  formula ||std(t) * score + n||^2 is the continuous-time loss of Song et al., the DDPM epsilon loss (discrete VP:
  score = -eps_hat / std) and the SMLD loss (discrete VE), each on the indices below int(N * flow_start).
- `flow_nll_loss`: the negative log-likelihood, in nats, of x(t*) drawn from the forward marginal at t*.

Both draw their randomness in a fixed order (times, then noise) from `generator`, or from the global torch RNG when
it is `None`; the training script uses the global RNG, whose state `accelerate` checkpoints.
"""

import hashlib
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .validation import check_choice

LOSS_REDUCTIONS = ("mean", "sum")
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def _expand_as(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def score_matching_loss(
    unet: torch.nn.Module,
    scheduler,
    clean_images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Denoising score matching at times below t*, one value per sample.

    t = `scheduler.sample_training_timesteps(B)` (continuous: U(eps, T) * flow_start; discrete: an index below
    int(N * flow_start)), n ~ N(0, I), x(t) = mean(t) * x0 + std(t) * n, score = the network's output converted by
    `scheduler.output_to_score`, loss = ||std(t) * score + n||^2 averaged over the dimensions (`reduce="mean"`) or
    halved and summed (`reduce="sum"`, Song et al.'s `reduce_mean=False`).

    Args:
        unet (`torch.nn.Module`): the score network, called as `unet(x, scheduler.model_timestep(t)).sample`
            (a `UNet2DModel`, possibly wrapped for distributed training).
        scheduler (`DiNofScheduler`): gives the times, marginals, conditioning and parameterisation.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the times and the noise (in that order).
        reduce (`str`, defaults to `"mean"`): `"mean"` or `"sum"` over the dimensions of a sample.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32: the per-sample losses.
    """
    check_choice(reduce, "reduce", LOSS_REDUCTIONS)
    batch_size = clean_images.shape[0]
    timesteps = scheduler.sample_training_timesteps(batch_size, device=clean_images.device, generator=generator)
    noise = randn_tensor(clean_images.shape, generator=generator, device=clean_images.device, dtype=torch.float32)
    noise = noise.to(clean_images.dtype)

    _, std = scheduler.marginal_mean_std(timesteps)
    noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
    model_output = unet(noisy_images, scheduler.model_timestep(timesteps)).sample
    score = scheduler.output_to_score(model_output.float(), noisy_images.float(), timesteps)

    residual = (_expand_as(std, score) * score + noise.float()).flatten(1)
    if reduce == "mean":
        return residual.square().mean(dim=1)
    return 0.5 * residual.square().sum(dim=1)


def flow_marginal_sample(
    scheduler, clean_images: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """x(t*) = mean(t*) * x0 + std(t*) * n, n ~ N(0, I): what the flow prior learns to model.

    Args:
        scheduler (`DiNofScheduler`): gives t* and the marginal.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the noise.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)` in the dtype of `clean_images`.
    """
    batch_size = clean_images.shape[0]
    t_star = torch.full((batch_size,), scheduler.t_star, device=clean_images.device, dtype=torch.float32)
    noise = randn_tensor(clean_images.shape, generator=generator, device=clean_images.device, dtype=torch.float32)
    return scheduler.add_noise(clean_images, noise.to(clean_images.dtype), t_star)


def flow_nll_loss(
    flow_prior: torch.nn.Module,
    scheduler,
    clean_images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Negative log-likelihood of x(t*) under the flow prior, in nats, one value per sample.

    The flow is called through its `forward` (not `log_prob`), so that a `DistributedDataParallel` wrapper sees the
    call and synchronises the gradients. On its first call the flow initialises its ActNorm layers from this batch
    (all-reducing the statistics across ranks under `torch.distributed`).

    Args:
        flow_prior (`torch.nn.Module`): a `FlowPriorModel`, possibly wrapped for distributed training.
        scheduler (`DiNofScheduler`): gives t* and the marginal.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the noise.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32: -log p(x(t*)).
    """
    noisy_images = flow_marginal_sample(scheduler, clean_images, generator=generator)
    return -flow_prior(noisy_images).log_prob.float()


def nats_to_bits_per_dim(nll: Union[torch.Tensor, float], num_dims: int) -> Union[torch.Tensor, float]:
    """Converts a negative log-likelihood in nats per sample to bits per dimension: nll / (D ln 2).

    x(t*) is continuous (it carries Gaussian noise), so no dequantisation offset applies.
    """
    return nll / (num_dims * math.log(2.0))


class TrainingImages(torch.utils.data.Dataset):
    """The training images of a `datasets.Dataset`, transformed, with reproducible random augmentation.

    The random transforms of an image (crop, flip) draw from the global torch RNG inside `torch.random.fork_rng`,
    seeded from (seed, epoch, index): the augmentation of each image is fixed by its position in the run, and loading
    data never touches the training RNG. This matters for resuming: `accelerate`'s data loader fetches one batch ahead,
    so augmentation drawn from the training RNG would be drawn before a checkpoint in the original run and after it in
    the resumed one.

    Args:
        dataset (`datasets.Dataset`): the data.
        image_column (`str`): the column holding PIL images.
        transform (`Callable`): PIL image -> tensor; may use the global torch RNG.
        seed (`int`): the run's seed.
    """

    def __init__(self, dataset, image_column: str, transform, seed: int):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch; the next data loader iterator (and its workers) augment with it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = self.dataset[int(index)][self.image_column]
        seed = hash((self.seed, self.epoch, int(index))) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {"input": self.transform(image)}


class TrainingState:
    """The counters of a training run, checkpointed with `accelerator.register_for_checkpointing`.

    Args:
        global_step (`int`): optimisation steps taken (skipped non-finite steps included).
        nonfinite_steps (`int`): optimisation steps skipped because a loss or the gradient norm was not finite.
    """

    def __init__(self, global_step: int = 0, nonfinite_steps: int = 0):
        self.global_step = global_step
        self.nonfinite_steps = nonfinite_steps

    def state_dict(self) -> Dict[str, int]:
        return {"global_step": self.global_step, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.global_step = int(state_dict["global_step"])
        self.nonfinite_steps = int(state_dict["nonfinite_steps"])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: `checkpoint-<step>` folders in the output directory, written atomically.
# ----------------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Union[str, os.PathLike]) -> List[str]:
    """The complete checkpoints in `output_dir` (folders `checkpoint-<step>`), oldest first.

    Folders still being written (`.tmp-checkpoint-*`) do not match and are never listed.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), name))
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def checkpoint_step(path: Union[str, os.PathLike]) -> int:
    """The step of a `checkpoint-<step>` folder."""
    match = _CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"{path!r} is not a `{CHECKPOINT_PREFIX}<step>` folder.")
    return int(match.group(1))


def prune_checkpoints(output_dir: Union[str, os.PathLike], total_limit: Optional[int]) -> List[str]:
    """Deletes the oldest checkpoints so that at most `total_limit` remain; returns the deleted paths."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(
    accelerator, output_dir: Union[str, os.PathLike], step: int, total_limit: Optional[int] = None
) -> str:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` once complete.

    A run killed while saving leaves only a `.tmp-checkpoint-*` folder, which `list_checkpoints` ignores, so the
    previous checkpoints stay the latest good ones. The oldest checkpoints beyond `total_limit` are deleted only after
    the new one is in place. Call it on every process.

    Returns:
        The path of the new checkpoint.
    """
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    temporary_path = os.path.join(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final_path):  # a previous run's checkpoint of the same step
            shutil.rmtree(final_path)
        os.replace(temporary_path, final_path)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_path


def remove_stale_temporary_folders(output_dir: Union[str, os.PathLike]) -> None:
    """Deletes the `.tmp-*` folders an interrupted run left in `output_dir`."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".tmp-") and os.path.isdir(path):
            shutil.rmtree(path)


def save_pipeline_atomically(pipeline, output_dir: Union[str, os.PathLike], extra_files=None) -> None:
    """Saves `pipeline` (and `extra_files`) to `output_dir` so that no reader ever loads a half-written pipeline.

    Everything is first written to a temporary folder inside `output_dir`. Then the old `model_index.json` (what makes
    the folder a pipeline for `from_pretrained`) is removed, every component folder and file is moved into place, and
    the new `model_index.json` comes last: the folder is either the previous complete pipeline, no pipeline, or the
    new complete one. Other contents of `output_dir` (checkpoints, logs) are left alone.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to save (`save_pretrained`, safetensors).
        output_dir (`str` or `os.PathLike`): the destination folder, created if needed.
        extra_files (`Dict[str, Callable[[str], None]]`, *optional*): file name -> a function writing that file to
            the path it is given (e.g. the model card and the sample grid).
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=output_dir)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for name, write in (extra_files or {}).items():
            write(os.path.join(staging, name))
        index_path = os.path.join(output_dir, "model_index.json")
        if os.path.exists(index_path):
            os.remove(index_path)
        for name in sorted(os.listdir(staging)):
            if name == "model_index.json":
                continue
            destination = os.path.join(output_dir, name)
            if os.path.isdir(destination) and not os.path.islink(destination):
                shutil.rmtree(destination)
            elif os.path.lexists(destination):
                os.remove(destination)
            os.replace(os.path.join(staging, name), destination)
        os.replace(os.path.join(staging, "model_index.json"), index_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def state_dict_hashes(module: torch.nn.Module) -> Dict[str, str]:
    """SHA-256 of every parameter and buffer of `module` (bit-exact), for comparing replicas across processes."""
    hashes = {}
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        hashes[name] = hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return hashes
