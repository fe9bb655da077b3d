"""The model card (README.md) that the training script writes next to a trained DiNof pipeline."""

from typing import Any, Dict, List, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData

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
