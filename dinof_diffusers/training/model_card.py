"""The model card (README.md) that the training script writes next to a trained DiNof pipeline."""

import json
import os
from typing import Any, Dict, List, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..config_utils import public_config

MODEL_CARD_TAGS = ["dinof", "normalizing-flow", "score-sde", "unconditional-image-generation", "diffusers"]

DINOF_CITATION = """@article{zand2024dinof,
  title   = {Diffusion Models with Deterministic Normalizing Flow Priors},
  author  = {Zand, Mohsen and Etemad, Ali and Greenspan, Michael},
  journal = {Transactions on Machine Learning Research},
  year    = {2024}
}"""

_COMPONENT_TEXT = {
    "joint": "the score network and the flow prior, trained jointly (one Adam optimiser on the sum of the losses)",
    "score": "the score network (the flow prior, if any, is unchanged from the starting pipeline)",
    "flow": "the flow prior, on a frozen score network copied unchanged from the starting model",
}


def create_model_card(
    repo_id_or_path: str,
    dataset_description: str,
    training_config: Dict[str, Any],
    train_component: str,
    hub_datasets: Optional[List[str]] = None,
    samples_filename: Optional[str] = "samples.png",
    samples_description: str = "",
    base_model: Optional[str] = None,
    score_trained_to_T: bool = False,
    license: str = "apache-2.0",
) -> ModelCard:
    """Builds the model card of a trained DiNof pipeline.

    Args:
        repo_id_or_path (`str`): what `DiNofPipeline.from_pretrained` is given in the usage snippet.
        dataset_description (`str`): the training data as a reader should see it (a Hub id, a folder, "digits").
        training_config (`Dict[str, Any]`): the training settings, written out as YAML (plain values only).
        train_component (`str`): "joint", "score" or "flow".
        hub_datasets (`List[str]`, *optional*): Hub data set ids for the card's `datasets` metadata.
        samples_filename (`str`, *optional*): the sample grid beside the card; `None` for none.
        samples_description (`str`): how the grid was sampled (steps, seed, weights).
        base_model (`str`, *optional*): the pretrained model training started from.
        score_trained_to_T (`bool`, defaults to `False`): whether the score network was trained on the whole time
            range [eps, T] (then the baseline sampler from T is valid) rather than below t* only.
        license (`str`, defaults to `"apache-2.0"`): the card's license metadata.

    Returns:
        `huggingface_hub.ModelCard`; `.save(path)` writes it.
    """
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(MODEL_CARD_TAGS),
        datasets=list(hub_datasets) if hub_datasets else None,
        pipeline_tag="unconditional-image-generation",
        base_model=base_model,
    )
    scheduler = training_config.get("scheduler", {})
    sections = [
        f"# DiNof: {dataset_description}",
        "A DiNof model (*Diffusion Models with Deterministic Normalizing Flow Priors*, Zand, Etemad and Greenspan, "
        "TMLR 2024) trained on "
        f"**{dataset_description}**. A Glow normalizing flow maps Gaussian noise to the partially diffused data "
        f"x(t*), t* = {scheduler.get('flow_start', 'flow_start')} T, and the predictor-corrector sampler of the "
        f"{str(scheduler.get('sde_type', '')).upper()} score SDE runs only from t* down to eps.",
        f"Trained here: {_COMPONENT_TEXT[train_component]}."
        + (f" Starting point: `{base_model}`." if base_model else ""),
    ]
    if samples_filename:
        sections += ["## Samples", f"![samples]({samples_filename})", samples_description]
    sections += [
        "## Usage",
        "```python\n"
        "import torch\n"
        "from dinof_diffusers import DiNofPipeline\n\n"
        f'pipeline = DiNofPipeline.from_pretrained("{repo_id_or_path}")\n'
        "images = pipeline(batch_size=16, generator=torch.manual_seed(0)).images\n"
        'images[0].save("dinof_sample.png")\n'
        "```\n\n"
        "`use_flow_prior=False` runs the baseline sampler from the SDE prior at T instead; "
        + (
            "the score network was trained on the whole time range [eps, T], so it is valid for both."
            if score_trained_to_T
            else "the score network was trained on the noise levels below t* only, so the baseline would need a "
            "network trained on the whole time range."
        ),
        "## Training configuration",
        f"Data set: {dataset_description}.",
        "```yaml\n" + yaml.safe_dump(training_config, sort_keys=False, default_flow_style=False).rstrip() + "\n```",
        "## Citation",
        "```bibtex\n" + DINOF_CITATION + "\n```",
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def run_model_card(
    run,
    dataset_description: str,
    pipeline,
    steps: int,
    nonfinite_steps: int,
    total_batch_size: int,
    mixed_precision: str,
    samples_description: str,
) -> ModelCard:
    """The model card of the pipeline a training run saves.

    Args:
        run (`RunConfig`): the run's settings.
        dataset_description (`str`): the training data as a reader should see it.
        pipeline (`DiNofPipeline`): the trained pipeline (its scheduler and flow prior configurations are recorded).
        steps (`int`), nonfinite_steps (`int`): optimisation steps taken, and skipped for a non-finite loss.
        total_batch_size (`int`): images per optimisation step, all processes together.
        mixed_precision (`str`): accelerate's precision setting.
        samples_description (`str`): how the sample grid beside the card was drawn.
    """
    flow_prior = pipeline.flow_prior
    training_config = {
        "train_component": run.train_component,
        "steps": steps,
        "nonfinite_steps_skipped": nonfinite_steps,
        "total_batch_size": total_batch_size,
        "unet": run.unet_source,
        "resolution": run.resolution,
        "num_channels": run.num_channels,
        "scheduler": public_config(pipeline.scheduler.config),
        "flow_prior": public_config(flow_prior.config) if flow_prior is not None else None,
        "optimizer": {
            "name": "Adam",
            "learning_rate": run.learning_rate,
            "lr_scheduler": run.lr_scheduler,
            "lr_warmup_steps": run.lr_warmup_steps,
            "betas": [run.adam_beta1, run.adam_beta2],
            "eps": run.adam_epsilon,
            "weight_decay": run.adam_weight_decay,
            "max_grad_norm": run.max_grad_norm,
        },
        "loss_reduction": run.loss_reduction,
        "score_time_range": "[eps, T]" if run.score_time_range == "full" else "[eps, T] * flow_start",
        "flow_loss_weight": run.flow_loss_weight,
        "ema_decay": run.ema_decay if run.use_ema else None,
        "mixed_precision": mixed_precision,
        "seed": run.seed,
    }
    hub_dataset = run.dataset_name is not None and not os.path.isdir(run.dataset_name)
    return create_model_card(
        (run.hub_model_id or os.path.basename(os.path.normpath(run.output_dir)))
        if run.push_to_hub
        else run.output_dir,
        dataset_description,
        json.loads(json.dumps(training_config, default=str)),
        run.train_component,
        hub_datasets=[run.dataset_name] if hub_dataset else None,
        samples_description=samples_description,
        base_model=run.pretrained_model_name_or_path,
        score_trained_to_T=run.score_time_range == "full",
    )
