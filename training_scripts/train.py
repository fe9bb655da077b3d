#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train a DiNof model: a score network and a normalizing flow prior of x(t*) (Zand et al., TMLR 2024).

Structured like diffusers' examples/unconditional_image_generation/train_unconditional.py. Three modes:

- `--train_component joint` (the published recipe): score network and flow prior from scratch (or from a
  pretrained pipeline), one Adam optimiser on the sum of the score-matching loss and the flow's NLL, gradient clipping
  over both networks, an EMA of each.
- `--train_component score`: the score network only (the flow prior of a pretrained DiNof pipeline is kept as is).
- `--train_component flow`: the flow prior only, on a frozen pretrained score network (a DiNof pipeline, a diffusers
  pipeline with a `unet`, or a plain `UNet2DModel` / `NCSNppModel`; e.g. a published checkpoint converted with
  `dinof-convert-checkpoint`), which is copied unchanged into the output pipeline.
- `--train_component gaussian_prior`: no training; the moment-matched Gaussian prior of x(t*) is fitted in closed
  form to the data for such a frozen network, in seconds (the control for the flow; training/gaussian_prior.py).

Examples:

    # the embedded digits (no download), the tiny CPU preset
    accelerate launch training_scripts/train.py --num_channels 1 --resolution 16 --max_train_steps 3000 \\
        --output_dir outputs/digits

    # CIFAR-10, NCSN++ with the VE SDE, as published
    accelerate launch training_scripts/train.py --dataset_name cifar10 --image_column img \\
        --unet_config ncsnpp-cifar10-ve --random_flip --output_dir dinof-cifar10-ve

    # a flow prior for an existing score model
    accelerate launch training_scripts/train.py --train_component flow \\
        --pretrained_model_name_or_path google/ncsnpp-celebahq-256 --dataset_name <celeba-hq> --output_dir out
"""

import logging
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dinof_diffusers.file_utils import check_writable_folder, finish_interrupted_swap, remove_temporary_files
from dinof_diffusers.image_utils import save_image_atomically
from dinof_diffusers.schedulers import DiNofScheduler
from dinof_diffusers.training import RunConfig, TrainingError, build_models, checkpoints, resolve_run_config
from dinof_diffusers.training.data import (
    TrainingImages,
    check_images,
    image_transforms,
    load_training_dataset,
    reference_images,
)
from dinof_diffusers.training.gaussian_prior import fit_gaussian_prior
from dinof_diffusers.training.losses import flow_nll_loss, nats_to_bits_per_dim, score_matching_loss
from dinof_diffusers.training.model_card import run_model_card
from dinof_diffusers.training.run_config import run_config_parser
from dinof_diffusers.training.samples import averaged_copy, log_sample_grid, make_pipeline, sample_grid

logger = get_logger(__name__, log_level="INFO")


def parse_args(input_args=None) -> RunConfig:
    # Every flag, with its default and help, is a field of RunConfig (`train.py --help` lists them by group).
    parser = run_config_parser(description="Train a DiNof model (score network + normalizing flow prior).")
    args = parser.parse_args(input_args)
    try:
        run = resolve_run_config(args)  # preset < pretrained model < flags; every check, before anything is loaded
        check_writable_folder(run.output_dir, "--output_dir")
    except (TrainingError, ValueError) as error:
        parser.error(str(error))
    return run


def main(run: RunConfig):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if run.train_component == "gaussian_prior":  # closed form: no optimiser, no training loop
        fit_gaussian_prior(run)
        return
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(
            project_dir=run.output_dir, logging_dir=os.path.join(run.output_dir, run.logging_dir)
        ),
        # The data order depends on (seed, epoch) only, so that a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed),
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_main_process:
        os.makedirs(run.output_dir, exist_ok=True)
        repaired = finish_interrupted_swap(run.output_dir, checkpoints.PIPELINE_INDEX_NAME)  # a killed final save
        if repaired:
            logger.warning("%s.", repaired[0].upper() + repaired[1:])
        remove_temporary_files(run.output_dir)  # what an interrupted run was writing
    accelerator.wait_for_everyone()
    # the checkpoint to resume, checked (and its settings compared below) before any data is loaded; every process
    # comes to the same choice
    resume_path, resume_warnings = checkpoints.checkpoint_to_resume(
        run.output_dir, run.resume_from_checkpoint, accelerator.num_processes
    )
    set_seed(run.seed)

    # 1. models and scheduler; the score network's training times are those of a scheduler with t* = T for
    # --score_time_range full
    unet, flow_prior, scheduler = build_models(run)
    trained_models = ([unet] if run.train_unet else []) + ([flow_prior] if run.train_flow else [])
    for model in (unet, flow_prior):
        if model is not None:
            model.train(model in trained_models)
            if model not in trained_models:  # a trained one keeps its fixed parameters (NCSN++'s Fourier features)
                model.requires_grad_(False)
                model.to(accelerator.device)
    score_scheduler = scheduler
    if run.score_time_range == "full":
        score_scheduler = DiNofScheduler.from_config(scheduler.config, flow_start=1.0)
    record = checkpoints.run_record(run, unet, flow_prior)  # written into every checkpoint (run_config.json)
    if resume_path is not None:
        saved_record = checkpoints.read_run_record(resume_path)
        if saved_record is None:
            resume_warnings.append(f"{resume_path} has no run_config.json: its settings cannot be compared.")
        else:
            resume_warnings += checkpoints.compare_run_records(saved_record, record, resume_path)
    for warning in resume_warnings:
        logger.warning(warning)

    # 2. data: augmentation seeded by (seed, epoch, index); the loader's own generator, so that creating an iterator
    # (which draws a worker seed) leaves the global RNG alone: a resumed run creates one at another point of the run
    dataset, dataset_description = load_training_dataset(run)
    if run.strict_images:
        check_images(dataset, run.image_column)  # every image decodes, or stop with the list of those that do not
    train_images = TrainingImages(dataset, run.image_column, image_transforms(run, scheduler.data_range), run.seed)
    grid_images = reference_images(train_images.read, run, scheduler.data_range).to(accelerator.device)
    train_dataloader = torch.utils.data.DataLoader(
        train_images,
        batch_size=run.train_batch_size,
        shuffle=True,
        num_workers=run.dataloader_num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(run.seed),
    )

    # 3. optimiser: one Adam over every trained network (the published joint recipe), linear warm-up
    trained_parameters = [p for model in trained_models for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        trained_parameters,
        lr=run.learning_rate,
        betas=(run.adam_beta1, run.adam_beta2),
        weight_decay=run.adam_weight_decay,
        eps=run.adam_epsilon,
    )
    *trained_models, optimizer, train_dataloader = accelerator.prepare(*trained_models, optimizer, train_dataloader)
    unet = trained_models[0] if run.train_unet else unet
    flow_prior = trained_models[-1] if run.train_flow else flow_prior
    if len(train_dataloader) == 0:
        raise TrainingError(
            f"The data set has {len(dataset)} images, fewer than one batch per process (--train_batch_size "
            f"{run.train_batch_size})."
        )
    steps_per_epoch = math.ceil(len(train_dataloader) / run.gradient_accumulation_steps)
    max_train_steps = run.max_train_steps or run.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Stepped once per optimisation step by this script (not through accelerate, which would step it once per
    # process), so warm-up counts optimisation steps whatever the number of processes.
    lr_scheduler = get_scheduler(
        run.lr_scheduler,
        optimizer=optimizer.optimizer,
        num_warmup_steps=run.lr_warmup_steps,
        num_training_steps=max_train_steps,
    )

    # 4. EMA of every trained network (created after `prepare`, which made the replicas identical)
    networks = {"unet": unet, "flow_prior": flow_prior}  # None for a missing flow prior; prepared when trained
    unwrapped = {name: model if model is None else accelerator.unwrap_model(model) for name, model in networks.items()}
    emas = {}
    for name, trained in (("unet", run.train_unet), ("flow_prior", run.train_flow)):
        if run.use_ema and trained:
            emas[name] = EMAModel(unwrapped[name].parameters(), decay=run.ema_decay)
    state = checkpoints.TrainingState()
    accelerator.register_for_checkpointing(lr_scheduler, state, *emas.values())

    # 5. resume
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        try:
            accelerator.load_state(resume_path)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
            raise TrainingError(f"The checkpoint {resume_path} cannot be loaded into this run: {error}") from error
        for ema in emas.values():
            ema.to(accelerator.device)
    # Every process draws its own noise from here on (and a resumed run restores these RNG states).
    if state.global_step == 0:
        set_seed(run.seed, device_specific=True)
    first_epoch = state.global_step // steps_per_epoch
    skip_batches = (state.global_step % steps_per_epoch) * run.gradient_accumulation_steps

    if accelerator.is_main_process:
        accelerator.init_trackers("dinof", config=run.tracker_config())
    num_dims = run.num_channels * run.resolution**2
    total_batch = run.train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps
    logger.info("***** Running training (%s) *****", run.train_component)
    logger.info("  Examples = %d, total batch size = %d", len(dataset), total_batch)
    logger.info("  Optimisation steps = %d, starting at %d", max_train_steps, state.global_step)
    for name, model in unwrapped.items():
        if model is not None:
            logger.info("  %s parameters = %d", name, sum(p.numel() for p in model.parameters()))

    def averaged_networks():
        """Copies of the UNet and the flow prior (or None) with the EMA weights of the trained ones."""
        return {name: averaged_copy(unwrapped[name], emas.get(name)) for name in networks}

    last_grid = {}  # step -> (grid, nfe) of the latest grid, reused for the model card at the end

    def save_sample_grid(step):
        """Samples with the EMA weights (main process only); writes the grid and logs it."""
        if step not in last_grid:
            logger.info("Drawing the sample grid of step %d (%d images).", step, run.num_sample_images)
            pipeline = make_pipeline(scheduler=scheduler, show_progress=True, **averaged_networks())
            grid, images, nfe = sample_grid(run, pipeline, grid_images)
            save_image_atomically(grid, os.path.join(run.output_dir, "samples", f"step-{step:07d}.png"))
            log_sample_grid(accelerator.trackers, grid, images, step)
            last_grid.clear()
            last_grid[step] = (grid, nfe)
        return last_grid[step]

    # 6. the training loop
    progress_bar = tqdm(
        total=max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process
    )
    progress_bar.set_description("Steps")
    window_losses, window_batches, window_finite = torch.zeros(2, device=accelerator.device), 0, True
    consecutive_nonfinite = 0
    for epoch in range(first_epoch, num_epochs):
        if state.global_step >= max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # the order of the batches
        train_images.set_epoch(epoch)  # their augmentation
        epoch_dataloader = train_dataloader
        if epoch == first_epoch and skip_batches > 0:
            epoch_dataloader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in epoch_dataloader:
            clean_images = batch["input"]
            with accelerator.accumulate(*trained_models):
                # per-sample losses, (B, 2): score matching, flow NLL in nats (zero for a network not trained)
                losses = torch.zeros(clean_images.shape[0], 2, device=clean_images.device)
                loss = 0.0
                if run.train_unet:
                    score_losses = score_matching_loss(unet, score_scheduler, clean_images, reduce=run.loss_reduction)
                    loss, losses[:, 0] = loss + score_losses.mean(), score_losses.detach()
                if run.train_flow:
                    flow_nlls = flow_nll_loss(flow_prior, scheduler, clean_images)
                    loss, losses[:, 1] = loss + run.flow_loss_weight * flow_nlls.mean(), flow_nlls.detach()
                if window_batches == 0 and state.global_step + 1 in run.debug_nonfinite_steps:
                    loss, losses = loss * float("nan"), losses * float("nan")
                accelerator.backward(loss)

                # the same decision on every process: from the losses of all of them
                gathered = accelerator.gather(losses)
                window_finite = window_finite and bool(torch.isfinite(gathered).all())
                window_losses += gathered.mean(dim=0)
                window_batches += 1

                stepped, grad_norm = False, None
                if accelerator.sync_gradients:
                    if window_finite:
                        grad_norm = accelerator.clip_grad_norm_(trained_parameters, run.max_grad_norm)
                        # with fp16 the grad scaler skips inf/nan gradients itself (and lowers its scale)
                        if run.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
                            window_finite = False
                    if window_finite:
                        optimizer.step()
                        stepped = not accelerator.optimizer_step_was_skipped
                    optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue

            # one optimisation step is over (taken or skipped)
            state.global_step += 1
            progress_bar.update(1)
            learning_rate = lr_scheduler.get_last_lr()[0]  # the one this step used
            if stepped:
                lr_scheduler.step()
                for name, ema in emas.items():
                    ema.step(unwrapped[name].parameters())
            if not window_finite:
                state.nonfinite_steps += 1
                consecutive_nonfinite += 1
                logger.warning("Step %d skipped: non-finite loss or gradient norm.", state.global_step)
            else:
                consecutive_nonfinite = 0

            window_losses /= window_batches
            logs = {"lr": learning_rate, "nonfinite_steps": state.nonfinite_steps}
            if run.train_unet:
                logs["score_loss"] = window_losses[0].item()
            if run.train_flow:
                logs["flow_nll_bpd"] = nats_to_bits_per_dim(window_losses[1].item(), num_dims)
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item()
            if emas and next(iter(emas.values())).cur_decay_value is not None:
                logs["ema_decay"] = next(iter(emas.values())).cur_decay_value
            progress_bar.set_postfix(**{k: logs[k] for k in ("score_loss", "flow_nll_bpd") if k in logs})
            accelerator.log(logs, step=state.global_step)
            window_losses, window_batches, window_finite = torch.zeros(2, device=accelerator.device), 0, True

            stop_reason = state.nonfinite_stop_reason(consecutive_nonfinite, max_train_steps, run)
            if stop_reason is not None:
                saved = checkpoints.list_checkpoints(run.output_dir)
                accelerator.end_training()
                raise TrainingError(
                    f"Stopping at step {state.global_step}: {stop_reason}. No weights were updated by the skipped "
                    f"steps; the last checkpoint is {saved[-1] if saved else 'none (no checkpoint was saved yet)'}."
                )
            if state.global_step % run.checkpointing_steps == 0:
                path = checkpoints.save_checkpoint(
                    accelerator, run.output_dir, state.global_step, run.checkpoints_total_limit, record
                )
                logger.info("Saved state to %s", path)
            if state.global_step % run.save_images_steps == 0:
                if accelerator.is_main_process:
                    save_sample_grid(state.global_step)
                accelerator.wait_for_everyone()
            if state.global_step >= max_train_steps:
                break
    progress_bar.close()
    accelerator.wait_for_everyone()

    # 7. the end: per-process hashes (debugging), then the pipeline with the EMA weights and its model card
    if run.debug_hash_dir is not None:
        path = os.path.join(run.debug_hash_dir, f"rank{accelerator.process_index}.json")
        checkpoints.write_replica_hashes(path, unwrapped, averaged_networks())

    if accelerator.is_main_process:
        checkpoints.check_finite_weights(averaged_networks())  # nothing is saved from non-finite weights
        grid, nfe = save_sample_grid(state.global_step)
        pipeline = make_pipeline(scheduler=scheduler, **averaged_networks())
        card = run_model_card(
            run,
            dataset_description,
            pipeline,
            steps=state.global_step,
            nonfinite_steps=state.nonfinite_steps,
            total_batch_size=total_batch,
            mixed_precision=accelerator.mixed_precision,
            samples_description=(
                f"{run.num_sample_images} samples of the {'EMA ' if emas else ''}weights after {state.global_step} "
                f"steps, seed {run.sample_seed}, {nfe} score-network evaluations per image."
            ),
        )
        checkpoints.save_final_pipeline(run, pipeline, card, grid, f"DiNof, {state.global_step} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_config = parse_args()
    try:
        main(run_config)
    except TrainingError as error:
        sys.exit(f"error: {error}")
