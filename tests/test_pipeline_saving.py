"""Saving a trained pipeline into its output folder (which also holds the checkpoints), and loading it back.

A kill at every rename of the save leaves a folder that `DiNofPipeline.from_pretrained` or the next train.py run
completes into one whole pipeline (the old or the new one, never a mix); a full disk and an unwritable folder give
messages that name the path; a pipeline loaded in half precision gives no misleading float32 warning.
"""

import errno
import logging
import os
import shutil

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DModel

from dinof_diffusers import DiNofPipeline, DiNofScheduler, FlowPriorModel
from dinof_diffusers.file_utils import SWAP_NEW, SWAP_OLD, check_writable_folder, finish_interrupted_swap
from dinof_diffusers.training import TrainingError
from dinof_diffusers.training.checkpoints import PIPELINE_INDEX_NAME, save_checkpoint, save_pipeline_atomically


def tiny_pipeline(seed: int, with_flow: bool) -> DiNofPipeline:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )
    flow_prior = None
    if with_flow:
        flow_prior = FlowPriorModel(sample_size=8, in_channels=1, num_levels=1, flow_depth=1, hidden_channels=4)
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    return DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=flow_prior)


def card_writer(text):
    def write(path):
        with open(path, "w") as handle:
            handle.write(text)

    return write


class Killed(BaseException):
    """The process died here (a BaseException, like the KeyboardInterrupt of a SIGINT: no `except Exception`)."""


def kill_at_rename(monkeypatch, call_number):
    """The `call_number`-th os.replace / os.rename (0-based) kills the process: it raises `Killed`, and every later
    change to the file system raises too (a dead process changes nothing more: no cleanup handler runs through).

    Returns a list that receives one entry per rename attempted (to count them with `call_number=None`).
    """
    calls, dead = [], []
    real = {name: getattr(os, name) for name in ("replace", "rename")}

    def renaming(name):
        def rename(*args, **kwargs):
            if dead or len(calls) == call_number:
                dead.append(True)
                raise Killed()
            calls.append(args)
            return real[name](*args, **kwargs)

        return rename

    def mutating(function):
        def mutate(*args, **kwargs):
            if dead:
                raise Killed()
            return function(*args, **kwargs)

        return mutate

    for name in real:
        monkeypatch.setattr(os, name, renaming(name))
    for module, name in ((os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "makedirs"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, mutating(getattr(module, name)))
    return calls


def test_a_kill_at_any_rename_of_the_save_leaves_the_old_or_the_new_pipeline(tmp_path, monkeypatch):
    old, new = tiny_pipeline(0, with_flow=True), tiny_pipeline(1, with_flow=False)
    template = tmp_path / "template"
    save_pipeline_atomically(old, template, extra_files={"README.md": card_writer("old")})
    (template / "checkpoint-3").mkdir()
    (template / "checkpoint-3" / "model.safetensors").write_text("kept")
    weights = {
        "old": old.unet.state_dict()["conv_in.weight"],
        "new": new.unet.state_dict()["conv_in.weight"],
    }
    new_card = {"README.md": card_writer("new")}

    shutil.copytree(template, tmp_path / "count")
    with monkeypatch.context() as patch:  # the renames of a whole save
        renames = kill_at_rename(patch, None)
        save_pipeline_atomically(new, tmp_path / "count", extra_files=new_card)
    assert len(renames) >= 8  # staging, 3 entries in (unet, scheduler, README.md) and aside, flow_prior aside, commit

    versions = []
    for call_number in range(len(renames)):
        folder = tmp_path / f"killed-{call_number}"
        shutil.copytree(template, folder)
        with monkeypatch.context() as patch:
            kill_at_rename(patch, call_number)
            with pytest.raises(Killed):
                save_pipeline_atomically(new, folder, extra_files=new_card)
        if call_number % 2:  # what train.py does at its start
            finish_interrupted_swap(folder, PIPELINE_INDEX_NAME)
        loaded = DiNofPipeline.from_pretrained(folder)  # completes the swap itself
        version = "new" if torch.equal(loaded.unet.state_dict()["conv_in.weight"], weights["new"]) else "old"
        assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], weights[version])
        assert (loaded.flow_prior is None) == (version == "new")  # never a mix of the two pipelines
        assert (folder / "README.md").read_text() == version
        assert (folder / "flow_prior").exists() == (version == "old")  # the new one has none: the old is removed
        assert not (folder / SWAP_NEW).exists() and not (folder / SWAP_OLD).exists()
        assert (folder / "checkpoint-3" / "model.safetensors").read_text() == "kept"
        versions.append(version)
    # a kill before the staged pipeline is renamed into the folder keeps the old one; any later one ends with the new
    assert versions == ["old"] * versions.index("new") + ["new"] * (len(versions) - versions.index("new"))


def test_disk_full_while_saving_names_the_folder_and_the_free_space(tmp_path, monkeypatch):
    save_pipeline_atomically(tiny_pipeline(0, with_flow=False), tmp_path)
    before = sorted(os.listdir(tmp_path))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(TrainingError, match=r"disk is full.*the pipeline.*GiB free on the file system of") as error:
        save_pipeline_atomically(tiny_pipeline(1, with_flow=True), tmp_path)
    assert str(tmp_path) in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before  # the old pipeline intact, no staging folder left

    class Accelerator:  # what save_checkpoint uses of accelerate's: save_state writes half a file, then fails
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            os.makedirs(path)
            with open(os.path.join(path, "model.safetensors"), "wb") as handle:
                handle.write(b"half")
            disk_full()

    with pytest.raises(TrainingError, match=r"disk is full.*the checkpoint.*checkpoint-7.*GiB free"):
        save_checkpoint(Accelerator(), tmp_path, step=7)
    assert sorted(os.listdir(tmp_path)) == before  # the half-written checkpoint is deleted, freeing its space


def test_output_folders_that_are_files_or_cannot_be_created_are_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output_dir .*file.* is a file"):
        check_writable_folder(tmp_path / "file", "--output_dir")
    with pytest.raises(ValueError, match="--output_dir .*cannot be written to"):
        check_writable_folder(tmp_path / "file" / "below", "--output_dir")
    assert check_writable_folder(tmp_path / "new" / "run", "--output_dir") == str(tmp_path / "new" / "run")
    assert os.listdir(tmp_path / "new" / "run") == []  # the probe file is gone


def test_half_precision_loading_keeps_the_flow_in_float32_without_a_float32_warning(tmp_path):
    tiny_pipeline(0, with_flow=True).save_pretrained(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("diffusers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipeline = DiNofPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.flow_prior.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert not [r for r in records if "float32" in r.getMessage()], [r.getMessage() for r in records]
