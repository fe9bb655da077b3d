"""Bits per dimension of a data set under a DiNof pipeline: the flow prior (DiNof) and the SDE prior (baseline) side
by side, each a mean over images with its standard error, and their paired difference.

The images are cut into batches of `batch_size` (the last one may be smaller); batch b is evaluated with a CPU
`torch.Generator` seeded by `batch_seed(seed, b)` for each prior, so both priors see the same dequantization noise
and the same Hutchinson probes (the difference is paired image by image), and every batch can be computed on its own,
in any order, by any process. rk45 shares its steps across a batch, so a value depends slightly on its batch: keep
the batch size to reproduce a number (as for sample dumps).

`resumable_likelihood` adds what evaluate.py's `--likelihood` needs around `evaluate_likelihood`: the batches shared
out across the processes of `accelerate launch` (`run_sharded_batches`), and a records file written by the main
process after every round, from which an interrupted run resumes (a file made with other settings, images or weights
is refused). `likelihood_images` reads a data set's held-out images at a pipeline's size and channels.
"""

import hashlib
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..file_utils import write_json_atomically
from ..validation import check_choice, check_positive_int
from .distributed import process_state, run_on_main_process, run_sharded_batches
from .flow_gain import Estimate, mean_estimate
from .metrics import is_digits_reference, resolve_reference
from .sample_dump import (
    WEIGHTS_KEY,
    batch_seed,
    jsonable,
    list_images,
    load_run_records,
    scheduler_config,
    weights_fingerprint,
)

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


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py --likelihood: the held-out images, sharded and resumable
# ----------------------------------------------------------------------------------------------------------------

LIKELIHOOD_RECORDS_NAME = "likelihood.json"
DEFAULT_LIKELIHOOD_SPLIT = "test"
# The arguments of `evaluate_likelihood` that a value depends on: the identity of a likelihood's records.
_SETTINGS = ("batch_size", "seed", "priors", "num_bits", "dequantize", "trace_estimator", "rtol", "atol")


def likelihood_images(
    data: str,
    resolution: int,
    num_channels: int,
    max_samples: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    state=None,
) -> torch.Tensor:
    """The images of a data set as a float32 tensor (N, C, H, W) of values k / 255 in [0, 1].

    The data are found and written as PNGs by `resolve_reference` (as evaluate.py's `--reference`), on the main
    process only; every process then reads the folder.

    Args:
        data: "digits:test" (the 297 held-out digits of the fixed split), "digits:train", "digits"; a folder of images;
            a folder written by `Dataset.save_to_disk`; or a `datasets` name, optionally "name:split" (default split
            "test": held-out images).
        resolution: side length (the pipeline's): digits are resized bilinearly, data sets and folders centre-cropped
            and resized (bicubic) as references are.
        num_channels: 1 (greyscale) or 3 (RGB); images are converted.
        max_samples: only the first `max_samples` images.
        cache_dir: where written images are cached; default `default_cache_dir()`.
        state: an accelerate `PartialState`; default the current one.

    Raises:
        ValueError: a torch-fidelity registered input (its images are not files here), or no images.
    """
    from torch_fidelity.registry import DATASETS_REGISTRY

    check_positive_int(max_samples, "max_samples", allow_none=True)
    if data in DATASETS_REGISTRY:
        raise ValueError(
            f"{data!r} is a torch-fidelity input, whose images are not read here: give a `datasets` name with its "
            "held-out split (e.g. 'cifar10:test'), a folder of images or 'digits:test'."
        )

    def resolve() -> str:
        name, split = str(data), None
        if not os.path.isdir(name) and not is_digits_reference(name):
            name, _, split = name.partition(":")
        return str(
            resolve_reference(
                name,
                resolution=resolution,
                cache_dir=cache_dir,
                split=split or DEFAULT_LIKELIHOOD_SPLIT,
                max_samples=max_samples,
            )
        )

    folder = run_on_main_process(resolve, state)
    files = list_images(folder)[:max_samples]
    if not files:
        raise ValueError(f"No images in {folder} (the likelihood's data {data!r}).")
    mode = "L" if num_channels == 1 else "RGB"
    arrays = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (resolution, resolution):
                image = ImageOps.fit(image, (resolution, resolution), method=Image.BICUBIC)
            arrays.append(np.asarray(image).reshape(resolution, resolution, num_channels))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def _images_fingerprint(images: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}|".encode())
    digest.update(images.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def resumable_likelihood(
    pipeline,
    images: torch.Tensor,
    records_path: Union[str, os.PathLike],
    data: Optional[str] = None,
    overwrite: bool = False,
    show_progress: bool = True,
    state=None,
    **likelihood_kwargs,
) -> LikelihoodResult:
    """`evaluate_likelihood` with its batches shared out across processes and its finished batches written down.

    Every process of an `accelerate launch` must call it with the same arguments: the batches are dealt out
    round-robin (`run_sharded_batches`) and gathered after every round; the main process writes them to
    `records_path` (atomically). A run interrupted at any point resumes from the batches recorded there, on any
    number of processes, with the result of an uninterrupted run (every batch has its own seeds). The file's identity
    (the images' fingerprint, the settings, the scheduler configuration and the weights' fingerprint) must match:
    records of another one are refused unless `overwrite`.

    Args:
        pipeline (`DiNofPipeline`): a continuous-time pipeline, on this process's device.
        images (`torch.Tensor` of shape `(N, C, H, W)`): values in [0, 1].
        records_path: the records file (evaluate.py: `<output_dir>/likelihood.json`).
        data (`str`, *optional*): the name of the images, recorded in the identity.
        overwrite (`bool`, defaults to `False`): start afresh over records of another identity.
        show_progress (`bool`, defaults to `True`): one progress bar, on the main process, counting every process's
            images.
        state: an accelerate `PartialState`; default the current one (one process when not launched).
        **likelihood_kwargs: `batch_size`, `seed`, `priors`, `num_bits`, `dequantize`, `trace_estimator`, `rtol`,
            `atol` of `evaluate_likelihood` (its defaults otherwise).

    Returns:
        [`LikelihoodResult`], the same on every process.

    Raises:
        EvaluationError: records of another identity (without `overwrite`), or a batch that failed on any process.
    """
    state = process_state(state)
    path = Path(records_path)
    arguments = inspect.signature(evaluate_likelihood).bind(pipeline, images, **likelihood_kwargs)
    arguments.apply_defaults()  # the identity holds every setting, defaults included
    settings = {key: arguments.arguments[key] for key in _SETTINGS}
    settings["priors"] = default_priors(pipeline) if settings["priors"] is None else list(settings["priors"])
    identity = jsonable(
        {
            "data": data,
            "images": _images_fingerprint(images),
            "num_images": len(images),
            **settings,
            "scheduler_config": scheduler_config(pipeline),
            WEIGHTS_KEY: weights_fingerprint(pipeline),
        }
    )

    def load() -> Dict[str, Any]:
        records = (
            load_run_records(path, identity, overwrite, f"the likelihood records {path}") if path.is_file() else None
        )
        if records is None:
            records = {"identity": identity, "batches": {}}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(records, path)
        return records

    records = run_on_main_process(load, state)

    def on_round(round_records: Dict[int, Dict[str, Any]]) -> None:
        records["batches"].update({str(index): record for index, record in round_records.items()})
        if state.is_main_process:
            write_json_atomically(records, path)

    def run_batches(indices, run_batch, finished):
        return run_sharded_batches(indices, run_batch, state, finished)

    return evaluate_likelihood(
        pipeline,
        images,
        show_progress=show_progress and state.is_main_process,
        run_batches=run_batches,
        records={int(index): record for index, record in records["batches"].items()},
        on_round=on_round,
        **settings,
    )
