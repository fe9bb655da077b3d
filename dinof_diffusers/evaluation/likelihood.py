"""Bits per dimension of a data set under a DiNof pipeline: the flow prior (DiNof) and the SDE prior (baseline) side
by side, each a mean over images with its standard error, and their paired difference.

The images are cut into batches of `batch_size` (the last one may be smaller); batch b is evaluated with a CPU
`torch.Generator` seeded by `batch_seed(seed, b)` for each prior, so both priors see the same dequantization noise
and the same Hutchinson probes (the difference is paired image by image), and every batch can be computed on its own,
in any order, by any process. rk45 shares its steps across a batch, so a value depends slightly on its batch: keep
the batch size to reproduce a number (as for sample dumps).
"""

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..validation import check_choice, check_positive_int
from .flow_gain import Estimate, mean_estimate
from .sample_dump import batch_seed

# "flow": the pipeline's flow prior at t* (DiNof); "sde": the SDE prior at T (the baseline). docs/DESIGN.md names.
LIKELIHOOD_PRIORS = ("flow", "sde")


@dataclass
class LikelihoodResult:
    """The bits per dimension of a set of images, per prior.

    Args:
        priors (`Dict[str, Estimate]`): prior ("flow", "sde") -> the mean over images with its standard error, in
            bits per dimension and in nats per image (of the `num_bits`-bit data; of the continuous density on
            [0, 1]^D without `num_bits`).
        difference (`Estimate`, *optional*): "flow - sde", the paired per-image difference (negative: the flow prior
            gives the images a higher likelihood); `None` unless both priors were evaluated.
        nfe (`Dict[str, float]`): prior -> network evaluations (each with one backward pass) per batch, averaged.
        seconds_per_image (`Dict[str, float]`): prior -> wall-clock seconds per image.
        num_images (`int`), batch_size (`int`), seed (`int`): what was evaluated, and how.
        settings (`Dict[str, Any]`): num_bits, dequantize, trace_estimator, rtol, atol.
        per_image (`Dict[str, List[float]]`): prior -> the bits per dimension of every image, in order.
    """

    priors: Dict[str, Estimate] = field(default_factory=dict)
    difference: Optional[Estimate] = None
    nfe: Dict[str, float] = field(default_factory=dict)
    seconds_per_image: Dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    batch_size: int = 0
    seed: int = 0
    settings: Dict[str, Any] = field(default_factory=dict)
    per_image: Dict[str, List[float]] = field(default_factory=dict)

    def to_dict(self, per_image: bool = False) -> Dict[str, Any]:
        """JSON-ready; the per-image values only with `per_image=True`."""
        result = asdict(self)
        if not per_image:
            result.pop("per_image")
        return result


def likelihood_batches(num_images: int, batch_size: int) -> List[slice]:
    """The batches of `num_images` images: `slice(b * batch_size, ...)`, the last one possibly smaller."""
    return [slice(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]


def likelihood_batch(
    pipeline, images: torch.Tensor, seed: int, priors: Sequence[str], **likelihood_kwargs
) -> Dict[str, Dict[str, Any]]:
    """One batch under each prior, each from a fresh CPU generator seeded with `seed`.

    Returns:
        prior -> {"bits_per_dim": [float per image], "nfe": int, "seconds": float}: JSON data.
    """
    record = {}
    for prior in priors:
        start = time.perf_counter()
        output = pipeline.log_likelihood(
            images,
            use_flow_prior=prior == "flow",
            generator=torch.Generator().manual_seed(seed),
            **likelihood_kwargs,
        )
        record[prior] = {
            "bits_per_dim": output.bits_per_dim.tolist(),
            "nfe": int(output.nfe),
            "seconds": time.perf_counter() - start,
        }
    return record


def default_priors(pipeline) -> List[str]:
    """Both priors for a pipeline with a flow prior, only the SDE prior without one."""
    return list(LIKELIHOOD_PRIORS) if getattr(pipeline, "flow_prior", None) is not None else ["sde"]


def summarize_likelihood(
    records: Dict[int, Dict[str, Dict[str, Any]]], num_dims: int, priors: Sequence[str], **info
) -> LikelihoodResult:
    """The `LikelihoodResult` of the records of every batch (`{batch index: likelihood_batch(...)}`)."""
    order = sorted(records)
    ln2_dims = num_dims * math.log(2.0)
    per_image = {prior: [value for b in order for value in records[b][prior]["bits_per_dim"]] for prior in priors}
    # mean_estimate takes nats per image; bits per dimension * D ln 2 are the nats of the (num_bits-bit) data
    nats = {prior: torch.tensor(values, dtype=torch.float64)[None] * ln2_dims for prior, values in per_image.items()}
    result = LikelihoodResult(
        priors={prior: mean_estimate(nats[prior], num_dims) for prior in priors},
        nfe={prior: sum(records[b][prior]["nfe"] for b in order) / len(order) for prior in priors},
        seconds_per_image={
            prior: sum(records[b][prior]["seconds"] for b in order) / len(per_image[prior]) for prior in priors
        },
        per_image=per_image,
        **info,
    )
    if set(LIKELIHOOD_PRIORS) <= set(priors):
        result.difference = mean_estimate(nats["flow"] - nats["sde"], num_dims)
    return result


def evaluate_likelihood(
    pipeline,
    images: torch.Tensor,
    batch_size: int = 64,
    seed: int = 0,
    priors: Optional[Sequence[str]] = None,
    num_bits: Optional[int] = 8,
    dequantize: bool = True,
    trace_estimator: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    show_progress: bool = True,
    run_batches: Optional[Callable] = None,
    records: Optional[Dict[int, Dict[str, Any]]] = None,
    on_round: Optional[Callable[[Dict[int, Dict[str, Any]]], None]] = None,
) -> LikelihoodResult:
    """Mean bits per dimension of `images` under each prior, with standard errors and the paired difference.

    Args:
        pipeline (`DiNofPipeline`): a continuous-time pipeline.
        images (`torch.Tensor` of shape `(N, C, H, W)`): values in [0, 1] (k / (2^b - 1) for b-bit data).
        batch_size (`int`, defaults to 64): images per ODE solve.
        seed (`int`, defaults to 0): batch b uses `batch_seed(seed, b)`.
        priors (`Sequence[str]`, *optional*): a subset of `("flow", "sde")`; default both (only "sde" for a
            pipeline without a flow prior).
        num_bits, dequantize, trace_estimator, rtol, atol: as for `DiNofPipeline.log_likelihood`.
        show_progress (`bool`, defaults to `True`): a progress bar over the images, with the running means.
        run_batches (`Callable`, *optional*): `run_batches(batch_indices, run_batch, on_round) -> {index: record}`
            runs the batches (e.g. shared out across processes); default: one after the other, here.
        records (`Dict[int, dict]`, *optional*): the records of batches already done (`LikelihoodResult` is made
            from every batch's record): those batches are not run again (resuming).
        on_round (`Callable`, *optional*): called with `{index: record}` of the newly finished batches (after every
            batch, or every round of `run_batches`), e.g. to write them down.

    Returns:
        [`LikelihoodResult`].
    """
    priors = default_priors(pipeline) if priors is None else list(priors)
    if not priors:
        raise ValueError(f"`priors` must name at least one of {LIKELIHOOD_PRIORS}.")
    for prior in priors:
        check_choice(prior, "priors", LIKELIHOOD_PRIORS)
    if "flow" in priors and getattr(pipeline, "flow_prior", None) is None:
        raise ValueError("`priors` includes 'flow', but the pipeline has no flow prior.")
    check_positive_int(batch_size, "batch_size")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(
            f"`images` must be a tensor (N, C, H, W) with N >= 1, got {getattr(images, 'shape', images)}."
        )
    settings = {
        "num_bits": num_bits,
        "dequantize": dequantize,
        "trace_estimator": trace_estimator,
        "rtol": rtol,
        "atol": atol,
    }
    batches = likelihood_batches(len(images), batch_size)
    pipeline.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(images), desc="bits/dim", unit="img", disable=not show_progress)
    running: Dict[str, List[float]] = {prior: [] for prior in priors}
    records = {index: record for index, record in (records or {}).items() if index < len(batches)}

    def run_batch(index: int):
        return likelihood_batch(pipeline, images[batches[index]], batch_seed(seed, index), priors, **settings)

    def show(round_records: Dict[int, Dict[str, Any]]) -> None:
        for record in round_records.values():
            for prior in priors:
                running[prior] += record[prior]["bits_per_dim"]
            bar.update(len(record[priors[0]]["bits_per_dim"]))
        if running[priors[0]]:
            bar.set_postfix({prior: f"{sum(v) / len(v):.4f}" for prior, v in running.items()})

    def finished(round_records: Dict[int, Dict[str, Any]]) -> None:
        show(round_records)
        if on_round is not None:
            on_round(round_records)

    show(records)
    todo = [index for index in range(len(batches)) if index not in records]
    try:
        if run_batches is None:
            for index in todo:
                record = {index: run_batch(index)}
                records.update(record)
                finished(record)
        else:
            records.update(run_batches(todo, run_batch, finished))
    finally:
        bar.close()
        pipeline.set_progress_bar_config(disable=False)
    info = {"num_images": len(images), "batch_size": batch_size, "seed": seed, "settings": settings}
    return summarize_likelihood(records, images[0].numel(), priors, **info)
