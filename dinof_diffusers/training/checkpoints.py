"""The state and the outputs of a training run: counters, `checkpoint-<step>` folders, the saved pipeline.

Every folder is written atomically (`dinof_diffusers.file_utils`): a run killed at any moment leaves the previous
checkpoints and pipeline intact, plus ".tmp-" folders that `remove_temporary_files` clears at the next start.
"""

import hashlib
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Union

import torch
from huggingface_hub import create_repo, upload_folder

from ..file_utils import TEMPORARY_PREFIX, replace_path, write_json_atomically

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


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
    # a name every process knows (`save_state` writes one file per process into it)
    temporary_path = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.exists(temporary_path):
        shutil.rmtree(temporary_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_path(temporary_path, final_path)  # also over a previous run's checkpoint of the same step
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_path


def checkpoint_to_resume(output_dir: Union[str, os.PathLike], resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint `--resume_from_checkpoint` names: a folder, the newest in `output_dir` for "latest" (`None` if
    there is none yet), or `None` for a fresh start."""
    if resume_from_checkpoint != "latest":
        return resume_from_checkpoint
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


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
    with tempfile.TemporaryDirectory(prefix=f"{TEMPORARY_PREFIX}pipeline-", dir=output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for name, write in (extra_files or {}).items():
            write(os.path.join(staging, name))
        index_path = os.path.join(output_dir, "model_index.json")
        if os.path.exists(index_path):
            os.remove(index_path)
        for name in sorted(os.listdir(staging)):
            if name != "model_index.json":
                replace_path(os.path.join(staging, name), os.path.join(output_dir, name))
        os.replace(os.path.join(staging, "model_index.json"), index_path)


def push_to_hub(run, commit_message: str) -> str:
    """Uploads the pipeline in `run.output_dir` (not its checkpoints, logs and sample grids) to the Hub repository
    `run.hub_model_id` (default: the output folder's name), created if needed; returns the repository id."""
    repo_id = run.hub_model_id or os.path.basename(os.path.normpath(run.output_dir))
    repo_id = create_repo(repo_id, exist_ok=True, private=run.hub_private_repo, token=run.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=run.output_dir,
        commit_message=commit_message,
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{TEMPORARY_PREFIX}*", f"{run.logging_dir}/*", "samples/*"],
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
