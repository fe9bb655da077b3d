"""The state and the outputs of a training run: counters, `checkpoint-<step>` folders, the saved pipeline.

Every folder is written atomically (`dinof_diffusers.file_utils`): a run killed at any moment leaves the previous
checkpoints and pipeline intact, plus ".tmp-" folders that `remove_temporary_files` clears at the next start. A
checkpoint also holds `run_config.json` (the run's settings and its networks' configurations, compared on resume) and
`manifest.json` (the size and SHA-256 of every file, checked on resume: a damaged latest checkpoint is skipped for
the newest intact one). The pipeline replaces the previous one with `file_utils.swap_folder_contents`, committed by
its model_index.json; a kill midway is completed by the next train.py run or `DiNofPipeline.from_pretrained`.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from huggingface_hub import create_repo, upload_folder

from ..code_bundle import write_code_bundle
from ..config_utils import public_config
from ..file_utils import (
    SWAP_NEW,
    SWAP_OLD,
    TEMPORARY_PREFIX,
    free_space_message,
    is_disk_full,
    replace_path,
    swap_folder_contents,
    write_json_atomically,
)
from .run_config import RunConfig, TrainingError

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
RUN_CONFIG_NAME = "run_config.json"
MANIFEST_NAME = "manifest.json"
PIPELINE_INDEX_NAME = "model_index.json"
# accelerate's file names: the weights of the first prepared model, and each process's random number generators
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
_RANDOM_STATES = re.compile(r"^random_states_(\d+)\.pkl$")
# The settings that define what a checkpoint's networks are (a resume that changes them is refused); the others are
# listed in a warning. Scheduler settings that only concern sampling (predictor, corrector, snr) are not among them.
_MODEL_SCHEDULER_KEYS = (
    "sde_type", "continuous", "prediction_type", "num_train_timesteps", "sigma_min", "sigma_max", "beta_min",
    "beta_max", "flow_start",
)  # fmt: skip
# flags that never matter for a resume (and the token, which is never written down)
_UNRECORDED_FLAGS = ("resume_from_checkpoint", "hub_token", "debug_hash_dir")


# the skipped-steps fraction is judged over at least this many steps (see `TrainingState.nonfinite_stop_reason`)
NONFINITE_FRACTION_MIN_STEPS = 100


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

    def nonfinite_stop_reason(self, consecutive: int, max_train_steps: int, run: RunConfig) -> Optional[str]:
        """Why the run must stop for its skipped (non-finite) steps, or `None` while it may go on.

        Two limits: `run.max_consecutive_nonfinite` skipped steps in a row, and more than `run.max_nonfinite_fraction`
        of the steps skipped. The fraction is judged over the steps taken so far, but never over fewer than the
        first `NONFINITE_FRACTION_MIN_STEPS` steps of the run (all of them if it is shorter): a skip in the first
        steps does not stop a long run at once, yet a run is stopped as soon as it is certain to end above the
        fraction, and a run that finishes has skipped at most that fraction of all its steps.

        Args:
            consecutive (`int`): the skipped steps in a row that end at the current step.
            max_train_steps (`int`): the optimisation steps of the whole run.
            run (`RunConfig`): the run's settings.
        """
        if consecutive >= run.max_consecutive_nonfinite:
            return (
                f"{consecutive} optimisation steps in a row had a non-finite loss or gradient norm "
                f"(--max_consecutive_nonfinite {run.max_consecutive_nonfinite})"
            )
        judged_steps = max(self.global_step, min(max_train_steps, NONFINITE_FRACTION_MIN_STEPS))
        if self.nonfinite_steps > run.max_nonfinite_fraction * judged_steps:
            return (
                f"{self.nonfinite_steps} of {self.global_step} optimisation steps had a non-finite loss or gradient "
                f"norm, more than --max_nonfinite_fraction {run.max_nonfinite_fraction} of "
                f"{'the steps so far' if judged_steps == self.global_step else f'the first {judged_steps} steps'}"
            )
        return None


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
    accelerator,
    output_dir: Union[str, os.PathLike],
    step: int,
    total_limit: Optional[int] = None,
    record: Optional[Dict[str, Any]] = None,
) -> str:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` once complete.

    A run killed while saving leaves only a `.tmp-checkpoint-*` folder, which `list_checkpoints` ignores, so the
    previous checkpoints stay the latest good ones. Before the rename the main process adds `run_config.json`
    (`record`, see `run_record`) and `manifest.json` (size and SHA-256 of every file). The oldest checkpoints beyond
    `total_limit` are deleted only after the new one is in place. Call it on every process.

    Returns:
        The path of the new checkpoint.

    Raises:
        TrainingError: the disk is full (the message names the folder and the free space); the unfinished
            checkpoint is deleted.
    """
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    # a name every process knows (`save_state` writes one file per process into it)
    temporary_path = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)
    accelerator.wait_for_everyone()
    with explain_disk_full(final_path, "the checkpoint", cleanup=temporary_path):
        accelerator.save_state(temporary_path)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if record is not None:
                write_json_atomically(record, os.path.join(temporary_path, RUN_CONFIG_NAME))
            write_json_atomically(
                {"files": _file_digests(temporary_path)}, os.path.join(temporary_path, MANIFEST_NAME)
            )
            replace_path(temporary_path, final_path)  # also over a previous run's checkpoint of the same step
            prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_path


@contextmanager
def explain_disk_full(path: Union[str, os.PathLike], what: str, cleanup: Optional[str] = None) -> Iterator[None]:
    """Turns a disk-full `OSError` raised inside the block into a `TrainingError` naming `path` and the free space;
    `cleanup` (a folder the block was writing) is deleted first, so that the space it took is given back."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise TrainingError(
            f"The disk is full: writing {what} to {os.fspath(path)!r} failed ({error.strerror or error}); "
            f"{free_space_message(path)}. The previous checkpoints and pipeline are intact."
        ) from error


def _file_digests(folder: str) -> Dict[str, Dict[str, Any]]:
    """relative path -> {"size", "sha256"} of every file under `folder` (the manifest of a checkpoint)."""
    digests = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            digests[os.path.relpath(path, folder)] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return digests


@dataclass
class CheckpointCheck:
    """What `check_checkpoint` found in a checkpoint folder.

    Args:
        damaged (`List[str]`): missing, truncated or altered files (other than random states): unusable.
        random_states (`List[str]`): missing or damaged random-state files: usable, but the resume is not exact.
        verified (`bool`): whether a manifest was there to check the files against (older checkpoints have none).
    """

    damaged: List[str] = field(default_factory=list)
    random_states: List[str] = field(default_factory=list)
    verified: bool = True


def check_checkpoint(path: Union[str, os.PathLike], num_processes: int = 1) -> CheckpointCheck:
    """Checks the files of a checkpoint folder against its manifest, and that every one of `num_processes`
    processes has its random states."""
    check = CheckpointCheck()
    manifest_path = os.path.join(path, MANIFEST_NAME)
    try:
        with open(manifest_path) as handle:
            expected = json.load(handle)["files"]
    except FileNotFoundError:
        check.verified = False
        if not any(os.path.isfile(os.path.join(path, name)) for name in _MODEL_FILES):
            check.damaged.append("it holds no checkpoint files (no model.safetensors or manifest.json)")
        expected = {name: None for name in os.listdir(path) if _RANDOM_STATES.match(name)}
    except (OSError, ValueError, KeyError, TypeError) as error:
        check.damaged.append(f"{MANIFEST_NAME} is unreadable ({error})")
        return check
    for name, digest in sorted(expected.items()):
        file_path = os.path.join(path, name)
        problem = None
        if not os.path.isfile(file_path):
            problem = f"{name} is missing"
        elif digest is not None and os.path.getsize(file_path) != digest["size"]:
            problem = f"{name} has {os.path.getsize(file_path)} bytes instead of {digest['size']}"
        elif digest is not None and _sha256(file_path) != digest["sha256"]:
            problem = f"{name} has been altered (SHA-256 differs)"
        if problem is not None:
            (check.random_states if _RANDOM_STATES.match(name) else check.damaged).append(problem)
    for index in range(num_processes):
        name = f"random_states_{index}.pkl"
        if name not in expected and not os.path.isfile(os.path.join(path, name)):
            check.random_states.append(f"{name} (process {index}) is missing")
    return check


def _sha256(path: str) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(chunk)
    return sha256.hexdigest()


def checkpoint_to_resume(
    output_dir: Union[str, os.PathLike], resume_from_checkpoint: Optional[str], num_processes: int = 1
) -> Tuple[Optional[str], List[str]]:
    """The checkpoint `--resume_from_checkpoint` names, checked, and the warnings to log about it.

    - `None`: a fresh start.
    - a folder: that checkpoint; it must hold an intact checkpoint.
    - "latest": the newest intact checkpoint in `output_dir`; damaged newer ones are skipped, each named in a
      warning. With no checkpoint at all the run starts afresh (the same command can then start and resume a job),
      which a warning says; with checkpoints but none intact it is an error.

    Missing or damaged random states do not stop a resume, but it will not repeat the uninterrupted run exactly:
    a warning says so.

    Returns:
        `(path or None, warnings)`.

    Raises:
        TrainingError: the named folder holds no intact checkpoint, or none of the checkpoints of `output_dir` is.
    """
    if resume_from_checkpoint is None:
        return None, []
    if resume_from_checkpoint != "latest":
        path = resume_from_checkpoint
        check = check_checkpoint(path, num_processes)
        if check.damaged:
            newest = list_checkpoints(path)
            hint = f" It holds checkpoints: did you mean {newest[-1]!r}?" if newest else ""
            raise TrainingError(
                f"--resume_from_checkpoint {path!r} is not an intact checkpoint: {'; '.join(check.damaged)}.{hint}"
            )
        return path, _check_warnings(path, check)
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return None, [
            f"--resume_from_checkpoint latest: no checkpoint in {os.fspath(output_dir)!r} yet, a new run starts."
        ]
    warnings = []
    for path in reversed(checkpoints):
        check = check_checkpoint(path, num_processes)
        if check.damaged:
            warnings.append(f"Skipping the damaged checkpoint {path}: {'; '.join(check.damaged)}.")
            continue
        if warnings:
            warnings.append(f"Resuming from {path}, the newest intact checkpoint.")
        return path, warnings + _check_warnings(path, check)
    raise TrainingError(
        f"--resume_from_checkpoint latest: none of the checkpoints in {os.fspath(output_dir)!r} is intact:\n"
        + "\n".join(warnings)
    )


def _check_warnings(path: str, check: CheckpointCheck) -> List[str]:
    warnings = []
    if not check.verified:
        warnings.append(f"{path} has no {MANIFEST_NAME} (an older checkpoint): its files cannot be checked.")
    if check.random_states:
        warnings.append(
            f"THE RESUME IS NOT EXACT: {'; '.join(check.random_states)} in {path}. Training goes on from the saved "
            "weights and optimiser, but with other random numbers (times, noise) than the uninterrupted run."
        )
    return warnings


def run_record(run: RunConfig, unet: torch.nn.Module, flow_prior: Optional[torch.nn.Module]) -> Dict[str, Any]:
    """What a checkpoint records of its run (run_config.json): the flags (not the Hub token) and resolved settings,
    and what defines its networks (`model`: their configurations, the SDE they learn, which of them are trained)."""
    flags = {f.name: getattr(run, f.name) for f in fields(run) if f.name not in _UNRECORDED_FLAGS}
    model = {
        "train_component": run.train_component,
        "use_ema": run.use_ema,
        "resolution": run.resolution,
        "num_channels": run.num_channels,
        "unet": public_config(unet.config),
        "flow_prior": None if flow_prior is None else public_config(flow_prior.config),
        "sde": {key: run.scheduler_config[key] for key in _MODEL_SCHEDULER_KEYS},
    }
    # JSON-plain values (mappings, tuples), as they read back from the file
    return json.loads(json.dumps({"run": flags, "model": model}, default=lambda value: dict(value)))


def compare_run_records(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str) -> List[str]:
    """Compares the `run_record` of a checkpoint with the current run's.

    Returns:
        One line per other changed setting (seed, learning rate, ...), for a warning.

    Raises:
        TrainingError: the networks differ (configuration, resolution, channels, SDE, trained components), naming
            each difference.
    """
    model_changes = _differences(saved.get("model", {}), current["model"], "")
    if model_changes:
        raise TrainingError(
            f"{checkpoint} holds a model that differs from this run's (checkpoint -> now): "
            + "; ".join(model_changes)
            + ". Resume with the checkpoint's settings, or use another --output_dir for a new run."
        )
    run_changes = _differences(saved.get("run", {}), current["run"], "--")
    return (
        [f"{checkpoint} was written with other settings (checkpoint -> now): " + "; ".join(run_changes)]
        if (run_changes)
        else []
    )


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str) -> List[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<not recorded>"), current.get(key, "<not recorded>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def read_run_record(checkpoint: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The `run_record` stored in a checkpoint, or `None` for one written without it."""
    path = os.path.join(checkpoint, RUN_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def nonfinite_tensors(networks: Mapping[str, Optional[torch.nn.Module]]) -> List[str]:
    """ "<network>.<tensor>" for every parameter and buffer with a NaN or an infinity."""
    found = []
    for name, module in networks.items():
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                found.append(f"{name}.{key}")
    return found


def check_finite_weights(networks: Mapping[str, Optional[torch.nn.Module]]) -> None:
    """Raises `TrainingError` naming the tensors with NaN or infinite values, if any (nothing may be saved then)."""
    found = nonfinite_tensors(networks)
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise TrainingError(
            f"The trained weights have non-finite values ({shown}): the pipeline, its model card and samples are "
            "not saved. Resume from an earlier checkpoint with a lower --learning_rate, or without mixed precision."
        )


def save_pipeline_atomically(pipeline, output_dir: Union[str, os.PathLike], extra_files=None) -> None:
    """Saves `pipeline` (and `extra_files`) to `output_dir` so that a kill at any moment leaves a loadable pipeline.

    Everything is first written to a ".tmp-" folder inside `output_dir`, then swapped in with
    `file_utils.swap_folder_contents`: the components and extra files move over (the old ones aside, kept until the
    end), the new model_index.json last, in one atomic rename. Until then the folder holds the previous pipeline;
    after a kill in between, the next train.py run and `DiNofPipeline.from_pretrained` complete the swap
    (`file_utils.finish_interrupted_swap`). Components of the previous pipeline that the new one lacks are removed.
    Other contents of `output_dir` (checkpoints, logs) are left alone.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to save (`save_pretrained`, safetensors).
        output_dir (`str` or `os.PathLike`): the destination folder, created if needed.
        extra_files (`Dict[str, Callable[[str], None]]`, *optional*): file name -> a function writing that file to
            the path it is given (e.g. the model card and the sample grid).

    Raises:
        TrainingError: the disk is full (the message names the folder and the free space).
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}pipeline-", dir=output_dir)
    with explain_disk_full(output_dir, "the pipeline"):
        try:
            pipeline.save_pretrained(staging, safe_serialization=True)
            for name, write in (extra_files or {}).items():
                write(os.path.join(staging, name))
            os.chmod(staging, 0o755)  # mkdtemp creates folders readable by the owner only
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        swap_folder_contents(staging, output_dir, PIPELINE_INDEX_NAME, remove=_pipeline_components(output_dir))


def _pipeline_components(folder: Union[str, os.PathLike]) -> List[str]:
    """The component folders named in `folder`'s model_index.json (none if there is no readable one)."""
    try:
        with open(os.path.join(folder, PIPELINE_INDEX_NAME)) as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return []
    return [name for name in index if not name.startswith("_") and os.path.basename(name) == name]


def save_final_pipeline(run, pipeline, card, grid, commit_message: str) -> None:
    """The end of a run: `pipeline` with its model card (README.md) and sample grid (samples.png) saved atomically to
    `run.output_dir` (`save_pipeline_atomically`), then uploaded with `push_to_hub` when `run.push_to_hub`."""
    extra_files = {"README.md": card.save, "samples.png": lambda path: grid.save(path)}
    save_pipeline_atomically(pipeline, run.output_dir, extra_files=extra_files)
    logger.info("Saved the pipeline to %s", run.output_dir)
    if run.push_to_hub:
        push_to_hub(run, pipeline, commit_message=commit_message)


def push_to_hub(run, pipeline, commit_message: str) -> str:
    """Uploads the pipeline saved in `run.output_dir` (not its checkpoints, logs and sample grids) to the Hub
    repository `run.hub_model_id` (default: the output folder's name), created if needed; returns the repository id.

    The folder first becomes the self-contained copy of `pipeline` (`code_bundle.write_code_bundle`), so that the
    repository loads with `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` without the package.
    """
    write_code_bundle(pipeline, run.output_dir)
    repo_id = run.hub_model_id or os.path.basename(os.path.normpath(run.output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, private=run.hub_private_repo, token=run.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=run.output_dir,
        commit_message=commit_message,
        ignore_patterns=[
            f"{CHECKPOINT_PREFIX}*",
            f"{TEMPORARY_PREFIX}*",
            f"{SWAP_NEW}/*",
            f"{SWAP_OLD}/*",
            f"{run.logging_dir}/*",
            "samples/*",
        ],  # fmt: skip
        token=run.hub_token,
    )
    return repo_id


def state_dict_hashes(module: torch.nn.Module) -> Dict[str, str]:
    """SHA-256 of every parameter and buffer of `module` (bit-exact), for comparing replicas across processes."""
    hashes = {}
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        hashes[name] = hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return hashes


def write_replica_hashes(
    path: Union[str, os.PathLike],
    networks: Dict[str, Optional[torch.nn.Module]],
    averaged: Dict[str, Optional[torch.nn.Module]],
) -> None:
    """Writes the `state_dict_hashes` of each network (`name`) and of its EMA copy (`ema_<name>`) to the JSON file
    `path` (one file per process, to compare the replicas); networks that are `None` are left out."""
    hashes = {}
    for name, module in networks.items():
        if module is not None:
            hashes.update({name: state_dict_hashes(module), f"ema_{name}": state_dict_hashes(averaged[name])})
    write_json_atomically(hashes, path)
