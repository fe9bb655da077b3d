"""The model card (README.md) that the training script writes next to a trained DiNof pipeline."""

import importlib.metadata
import json
import os
from typing import Any, Dict, List, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..config_utils import public_config
from ..hub_utils import is_local_path

MODEL_CARD_TAGS = ["dinof", "normalizing-flow", "score-sde", "unconditional-image-generation", "diffusers"]

DINOF_CITATION = """@article{zand2024dinof,
  title   = {Diffusion Models with Deterministic Normalizing Flow Priors},
  author  = {Zand, Mohsen and Etemad, Ali and Greenspan, Michael},
  journal = {Transactions on Machine Learning Research},
  year    = {2024}
}"""

# The package the pipeline's classes come from; the card says how to install it.
PACKAGE_NAME = "dinof-diffusers"

_COMPONENT_TEXT = {
    "joint": "the score network and the flow prior, trained jointly (one Adam optimiser on the sum of the losses)",
    "score": "the score network (the flow prior, if any, is unchanged from the starting pipeline)",
    "flow": "the flow prior, on a frozen score network copied unchanged from the starting model",
    "gaussian_prior": "nothing: the prior of x(t*) is the moment-matched Gaussian N(a mu, a^2 Sigma + s^2 I) of the "
    "training images' mean mu and covariance Sigma, (a, s) the marginal's coefficients at t* (`GaussianPriorModel`, "
    "fitted in closed form; the control for DiNof's flow), for a frozen score network copied unchanged from the "
    "starting model",
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
    score_time_range: Optional[str] = "t_star",
    license: str = "apache-2.0",
    package_version: Optional[str] = None,
) -> ModelCard:
    """Builds the model card of a trained DiNof pipeline.

    Args:
        repo_id_or_path (`str`): what `DiNofPipeline.from_pretrained` is given in the usage snippet.
        dataset_description (`str`): the training data as a reader should see it (a Hub id, a folder, "digits").
        training_config (`Dict[str, Any]`): the training settings, written out as YAML (plain values only).
        train_component (`str`): "joint", "score", "flow" or "gaussian_prior".
        hub_datasets (`List[str]`, *optional*): Hub data set ids for the card's `datasets` metadata.
        samples_filename (`str`, *optional*): the sample grid beside the card; `None` for none.
        samples_description (`str`): how the grid was sampled (steps, seed, weights).
        base_model (`str`, *optional*): the pretrained model training started from: a Hub id goes into the card's
            `base_model` metadata, a local folder only into the text (by its name: Hub metadata takes Hub ids only).
        score_time_range (`str`, *optional*, defaults to `"t_star"`): the times the score network was trained on
            here: "full" ([eps, T]: the baseline sampler from T is valid too), "t_star" (below t* only), or `None`
            when this run did not train it (the card then claims nothing about it).
        license (`str`, defaults to `"apache-2.0"`): the card's license metadata.
        package_version (`str`, *optional*): the version of dinof-diffusers that trained it (shown with the
            installation command).

    Returns:
        `huggingface_hub.ModelCard`; `.save(path)` writes it.
    """
    local_base = base_model is not None and is_local_path(base_model)
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(MODEL_CARD_TAGS),
        datasets=list(hub_datasets) if hub_datasets else None,
        pipeline_tag="unconditional-image-generation",
        base_model=None if local_base else base_model,
    )
    if local_base:
        base_model = f"a local model ({os.path.basename(os.path.normpath(base_model))})"
    elif base_model is not None:
        base_model = f"`{base_model}`"
    if score_time_range is None:
        time_range_text = (
            "the score network was not trained here (it is the starting model's, unchanged), so the time range it "
            "covers is that model's."
        )
    elif score_time_range == "full":
        time_range_text = "the score network was trained on the whole time range [eps, T], so it is valid for both."
    else:
        time_range_text = (
            "the score network was trained on the noise levels below t* only, so the baseline would need a network "
            "trained on the whole time range."
        )
    version = f"=={package_version}" if package_version else ""
    scheduler = training_config.get("scheduler", {})
    prior = "A Gaussian prior (no flow)" if train_component == "gaussian_prior" else "A Glow normalizing flow"
    sections = [
        f"# DiNof: {dataset_description}",
        "A DiNof model (*Diffusion Models with Deterministic Normalizing Flow Priors*, Zand, Etemad and Greenspan, "
        "TMLR 2024) trained on "
        f"**{dataset_description}**. {prior} maps Gaussian noise to the partially diffused data "
        f"x(t*), t* = {scheduler.get('flow_start', 'flow_start')} T, and the predictor-corrector sampler of the "
        f"{str(scheduler.get('sde_type', '')).upper()} score SDE runs only from t* down to eps.",
        f"Trained here: {_COMPONENT_TEXT[train_component]}."
        + (f" Starting point: {base_model}." if base_model else ""),
    ]
    if samples_filename:
        sections += ["## Samples", f"![samples]({samples_filename})", samples_description]
    sections += [
        "## Installation",
        f"The pipeline's classes (`DiNofPipeline`, `DiNofScheduler`, `FlowPriorModel`) come from the "
        f"`{PACKAGE_NAME}` package{f' (version {package_version} trained this model)' if package_version else ''}; "
        f"install it into the environment that has torch and diffusers, from the package index or from a checkout of "
        f"its repository:",
        f'```bash\npip install "{PACKAGE_NAME}{version}"    # or, in a checkout of the repository: pip install .\n```',
        "## Usage",
        "```python\n"
        "import torch\n"
        "from dinof_diffusers import DiNofPipeline\n\n"
        f'pipeline = DiNofPipeline.from_pretrained("{repo_id_or_path}")\n'
        "images = pipeline(batch_size=16, generator=torch.manual_seed(0)).images\n"
        'images[0].save("dinof_sample.png")\n'
        "```\n\n"
        "`use_flow_prior=False` runs the baseline sampler from the SDE prior at T instead; " + time_range_text,
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
        "flow_loss_weight": run.flow_loss_weight,
        "ema_decay": run.ema_decay if run.use_ema else None,
        "mixed_precision": mixed_precision,
        "seed": run.seed,
    }
    if run.train_unet:  # a flow-only run says nothing about how the score network was trained
        training_config["loss_reduction"] = run.loss_reduction
        training_config["score_time_range"] = "[eps, T]" if run.score_time_range == "full" else "[eps, T] * flow_start"
    if not run.train_flow:
        training_config.pop("flow_loss_weight")
    if run.train_component == "gaussian_prior":  # fitted in closed form: no optimisation settings
        for key in ("nonfinite_steps_skipped", "total_batch_size", "optimizer", "loss_reduction", "flow_loss_weight"):
            training_config.pop(key, None)
        training_config.update(steps=0, ema_decay=None, mixed_precision=None, random_flip=run.random_flip)
    hub_dataset = run.dataset_name is not None and not is_local_path(run.dataset_name)
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
        score_time_range=run.score_time_range if run.train_unet else None,
        package_version=_package_version(),
    )


def _package_version() -> Optional[str]:
    """The installed version of dinof-diffusers, if it is installed."""
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
