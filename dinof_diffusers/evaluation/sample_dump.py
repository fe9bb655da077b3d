"""Resumable sample dumps: a pipeline's samples as numbered PNGs plus a manifest, `generation.json`, that says which
weights, sampler and seeds made them; shared out across processes under `accelerate launch`.

A dump of N images in batches of B: batch b holds the images b * B, ... (the last batch may be smaller), drawn with a
CPU `torch.Generator` seeded by `batch_seed(seed, b)`. Every batch can therefore be (re)made on its own, by any
process: the PNGs are the same whether one process or many made them, in one run or in several interrupted ones.

The manifest's `identity` is what the images depend on: the number of images, the batch size, the seed, the sampler
keywords, the scheduler configuration and a fingerprint of the weights of every component. Its `batches` record,
for every finished batch, its NFE, its seconds and the process that made it. Only the main process writes it.
"""

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image
from tqdm.auto import tqdm

from ..config_utils import public_config
from ..file_utils import remove_temporary_files, write_json_atomically
from ..image_utils import save_image_atomically
from ..validation import check_int, check_positive_int
from .distributed import process_state, run_on_main_process, run_sharded_batches
from .errors import EvaluationError

logger = logging.get_logger(__name__)

MANIFEST_NAME = "generation.json"
WEIGHTS_KEY = "weights_fingerprint"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SAMPLE_NAME = re.compile(r"^\d+\.png$")


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch `batch_index` of a dump seeded with `seed`: independent of the batches before it."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint32)[0])


def sample_file_names(num_samples: int) -> List[str]:
    """The file names of a dump of `num_samples` images: zero-padded indices, `000000.png`, ..."""
    width = max(6, len(str(num_samples - 1)))
    return [f"{index:0{width}d}.png" for index in range(num_samples)]


def list_images(folder: Union[str, os.PathLike]) -> List[Path]:
    """The PNG / JPEG files directly inside `folder`, sorted (hidden and temporary files excluded)."""
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def weights_fingerprint(pipeline) -> Dict[str, str]:
    """A SHA-256 digest (16 hex digits) of the state dict of every `torch.nn.Module` in `pipeline.components`.

    Every entry's name, dtype, shape and bytes count, so two pipelines get the same fingerprint exactly when their
    weights are identical (on any device). A pipeline without `components` gets `{}`.
    """
    fingerprint = {}
    for name, component in sorted((getattr(pipeline, "components", None) or {}).items()):
        if not isinstance(component, torch.nn.Module):
            continue
        digest = hashlib.sha256()
        for key, tensor in component.state_dict().items():
            tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        fingerprint[name] = digest.hexdigest()[:16]
    return fingerprint


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data (tensors, numpy scalars, tuples, paths and unknown objects via `repr`)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def scheduler_config(pipeline) -> Optional[Dict[str, Any]]:
    """The public configuration of `pipeline.scheduler` as JSON data (`None` without one)."""
    config = getattr(getattr(pipeline, "scheduler", None), "config", None)
    return None if config is None else jsonable(public_config(config))


def _check_finite(images: Any, batch_index: int, seed: int, names: Sequence[str]) -> None:
    """Raises if a float batch of images holds NaN or inf: clipped to uint8 they would be black images, scored."""
    if isinstance(images, torch.Tensor):
        finite = torch.isfinite(images.detach()).flatten(1).all(1).cpu().numpy()
    elif isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images).reshape(len(images), -1).all(1)
    else:
        return  # PIL images (uint8) are finite
    if not finite.all():
        raise EvaluationError(
            f"Batch {batch_index} (images {names[0]} to {names[-1]}, seed {batch_seed(seed, batch_index)}): the "
            f"pipeline returned non-finite values (NaN or inf) in {int((~finite).sum())} of its {len(finite)} images. "
            "Nothing of this batch was written: such images would be saved black and scored as samples. Check the "
            "weights (a diverged training run, a faulty conversion) and the dtype."
        )


def _to_uint8_images(images: Any) -> List[np.ndarray]:
    """A pipeline's `.images` (tensor (B, C, H, W) or array (B, H, W, C) in [0, 1], or PIL list) as uint8 arrays
    of shape (H, W) (one channel) or (H, W, C)."""
    if isinstance(images, (list, tuple)) and len(images) > 0 and isinstance(images[0], Image.Image):
        return [np.asarray(image) for image in images]
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"Expected a batch of images (B, H, W, C) or (B, C, H, W), got shape {images.shape}.")
    # diffusers' numpy_to_pil convention: round(x * 255).
    images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return [image[..., 0] if image.shape[-1] == 1 else image for image in images]


def _is_readable_image(path: Path) -> bool:
    """Whether `path` exists and decodes completely (a truncated or overwritten PNG does not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):  # PIL's errors for missing, truncated and undecodable files
        return False


def _batch_names(names: Sequence[str], batch_size: int, index: int) -> Sequence[str]:
    return names[index * batch_size : (index + 1) * batch_size]


def generate_samples(
    pipeline,
    output_dir: Union[str, os.PathLike],
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
    state=None,
    **sampler_kwargs,
) -> Dict[str, Any]:
    """Generates `num_samples` images with `pipeline` and stores them as PNGs, resumably, on one or many processes.

    Batch b is drawn with a CPU `torch.Generator` seeded by `batch_seed(seed, b)` (see the module docstring). A batch
    is skipped when the manifest records it and all its PNGs decode; any other batch is generated again (a truncated
    or unreadable PNG is replaced). A dump interrupted at any point and run again with the same arguments, on any
    number of processes, is therefore byte-identical to an uninterrupted one (for a pipeline that is deterministic
    given its generator, on the same device and software; e.g. on CPU). The manifest records the arguments, the
    sampler keywords, the scheduler configuration and the weights' fingerprint (`weights_fingerprint`): resuming
    with other ones is refused. Each PNG and the manifest are written atomically (temporary file + rename);
    temporary files left by a killed run are removed. Other images in `output_dir` are left alone and are not part
    of the dump (`dump_files` lists the dump's).

    Under `accelerate launch` every process must call this function: the batches to make are shared out
    round-robin (`run_sharded_batches`), the main process checks the folder first and writes the manifest, and
    shows one progress bar counting every process's images. A batch's images do not depend on the number of
    processes; they do depend on `batch_size` (the published `langevin_norm="batch"` couples a batch).

    Args:
        pipeline: a `DiNofPipeline` (or any callable with the same signature): called as
            `pipeline(batch_size=..., generator=..., output_type="pt", **sampler_kwargs)` and returning an object
            with `.images` ((B, C, H, W) in [0, 1]) and `.nfe` (network evaluations per sample).
        output_dir: the folder of the PNGs and of `generation.json`.
        num_samples: number of images.
        batch_size: images per pipeline call.
        seed: the dump's seed.
        overwrite: delete an existing dump in `output_dir` made with other arguments or weights instead of raising.
        show_progress: show a progress bar over the images on the main process (the pipeline's own bar is silenced
            meanwhile, and set back to its default afterwards, through `set_progress_bar_config`).
        state: an accelerate `PartialState`; default the current one (one process when not launched).
        **sampler_kwargs: passed to every pipeline call (`num_inference_steps`, `use_flow_prior`,
            `flow_temperature`, ...).

    Returns:
        A dict, the same on every process, with `output_dir`, `num_samples`, `num_generated` (images generated by
        this call, by all processes), `nfe` (mean NFE per image over all batches), `seconds_per_image` (mean seconds
        of one process per image over all batches, the pipeline call and the transfer to the CPU, from every run
        that contributed), `num_processes`, `throughput` (of this call: `images_per_second` and `nfe_per_second`
        over all processes, `seconds` of wall clock, `num_images`; `None` when nothing was generated),
        `weights_fingerprint` and `files` (the PNG paths).

    Raises:
        EvaluationError (a ValueError): when `output_dir` holds a dump made with other arguments or weights (or PNGs
            without a manifest) and `overwrite` is False, or when the pipeline returns non-finite values.
        ValueError: on bad arguments.
    """
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    check_int(seed, "seed", minimum=0)
    for reserved in ("batch_size", "generator", "output_type", "return_dict"):
        if reserved in sampler_kwargs:
            raise ValueError(f"`{reserved}` is set by `generate_samples` and cannot be a sampler keyword.")
    state = process_state(state)
    output_dir = Path(output_dir)
    names = sample_file_names(num_samples)
    num_batches = -(-num_samples // batch_size)
    manifest_path = output_dir / MANIFEST_NAME

    def prepare() -> Tuple[Dict[str, Any], List[int]]:
        output_dir.mkdir(parents=True, exist_ok=True)
        identity = jsonable(
            {
                "num_samples": num_samples,
                "batch_size": batch_size,
                "seed": seed,
                "sampler_kwargs": sampler_kwargs,
                "scheduler_config": scheduler_config(pipeline),
                WEIGHTS_KEY: weights_fingerprint(pipeline),
            }
        )
        manifest = _load_or_reset_manifest(output_dir, manifest_path, identity, overwrite)
        remove_temporary_files(output_dir)  # the halves of a killed run's atomic writes
        todo = [
            index
            for index in range(num_batches)
            if str(index) not in manifest["batches"]
            or not all(_is_readable_image(output_dir / name) for name in _batch_names(names, batch_size, index))
        ]
        for index in todo:  # recorded again only once remade
            manifest["batches"].pop(str(index), None)
        write_json_atomically(manifest, manifest_path)
        strays = sorted(set(path.name for path in list_images(output_dir)) - set(names))
        if strays:
            logger.warning(
                f"{output_dir} holds {len(strays)} image(s) that are not part of the dump ({', '.join(strays[:3])}"
                f"{', ...' if len(strays) > 3 else ''}): they are left alone and not scored."
            )
        return manifest, todo

    manifest, todo = run_on_main_process(prepare, state)
    batches = manifest["batches"]
    num_done = num_samples - sum(len(_batch_names(names, batch_size, index)) for index in todo)

    def run_batch(index: int) -> Dict[str, Any]:
        batch_names = _batch_names(names, batch_size, index)
        generator = torch.Generator(device="cpu").manual_seed(batch_seed(seed, index))
        start = time.perf_counter()
        output = pipeline(batch_size=len(batch_names), generator=generator, output_type="pt", **sampler_kwargs)
        _check_finite(output.images, index, seed, batch_names)
        images = _to_uint8_images(output.images)
        seconds = time.perf_counter() - start
        if len(images) != len(batch_names):
            raise RuntimeError(f"The pipeline returned {len(images)} images for a batch of {len(batch_names)}.")
        for name, image in zip(batch_names, images):
            save_image_atomically(Image.fromarray(image), output_dir / name)
        return {
            "num_images": len(batch_names),
            "nfe": jsonable(getattr(output, "nfe", None)),
            "seconds": seconds,
            "process_index": state.process_index,
        }

    silence = getattr(pipeline, "set_progress_bar_config", None)
    if silence is not None:
        silence(disable=True)
    bar = tqdm(
        total=num_samples,
        initial=num_done,
        unit="img",
        desc="Generating",
        disable=not (show_progress and state.is_main_process),
    )

    def on_round(records: Dict[int, Dict[str, Any]]) -> None:
        batches.update({str(index): record for index, record in records.items()})
        if state.is_main_process:
            write_json_atomically(manifest, manifest_path)
        bar.update(sum(record["num_images"] for record in records.values()))

    start = time.perf_counter()
    try:
        generated = run_sharded_batches(todo, run_batch, state, on_round)
    finally:
        bar.close()
        if silence is not None:
            silence()  # the default bar again
    wall = time.perf_counter() - start

    records = [batches[str(index)] for index in range(num_batches)]
    total_images = sum(record["num_images"] for record in records)
    nfes = [record["nfe"] for record in records if isinstance(record["nfe"], (int, float))]
    num_generated = sum(record["num_images"] for record in generated.values())
    throughput = None
    if num_generated:
        evaluations = [
            record["nfe"] * record["num_images"]
            for record in generated.values()
            if isinstance(record["nfe"], (int, float))
        ]
        throughput = {
            "images_per_second": num_generated / wall,
            "nfe_per_second": sum(evaluations) / wall if evaluations else None,
            "seconds": wall,
            "num_images": num_generated,
        }
    return {
        "output_dir": str(output_dir),
        "num_samples": num_samples,
        "num_generated": num_generated,
        "nfe": float(np.mean(nfes)) if nfes else None,
        "seconds_per_image": sum(record["seconds"] for record in records) / total_images,
        "num_processes": state.num_processes,
        "throughput": throughput,
        WEIGHTS_KEY: manifest["identity"][WEIGHTS_KEY],
        "files": [str(output_dir / name) for name in names],
    }


def differing_keys(identity: Dict[str, Any], recorded: Dict[str, Any]) -> List[str]:
    """The keys whose values differ between two identities (a run's and a recorded one), sorted."""
    return sorted(key for key in set(identity) | set(recorded) if identity.get(key) != recorded.get(key))


def mismatch_reason(identity: Dict[str, Any], recorded: Dict[str, Any], differing: List[str]) -> str:
    """Why a recorded identity is not this run's: "other arguments (differing: ...)" and / or "other weights"."""
    arguments = [key for key in differing if key != WEIGHTS_KEY]
    reasons = [f"it was made with other arguments (differing: {', '.join(arguments)})"] if arguments else []
    if WEIGHTS_KEY in differing and WEIGHTS_KEY in recorded:
        ours, theirs = identity[WEIGHTS_KEY], recorded[WEIGHTS_KEY] or {}
        components = sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))
        reasons.append(f"it was made by other weights (differing: {', '.join(components)})")
    return " and ".join(reasons)


def load_run_records(path: Path, identity: Dict[str, Any], overwrite: bool, what: str) -> Optional[Dict[str, Any]]:
    """The records file of a resumable run at `path` (`{"identity": ..., "batches": {...}}`: a sample dump's manifest,
    a likelihood's records) if it belongs to `identity`.

    A file written before identities recorded the weights, with the same arguments, is adopted with a warning (its
    identity gets the fingerprint).

    Args:
        path: the file (it must exist).
        identity: this run's identity.
        overwrite: return `None` instead of raising for a file that cannot be read or belongs to another run.
        what: the run's name in messages ("the sample dump in <folder>").

    Raises:
        EvaluationError: the file cannot be read or belongs to another run (other arguments or weights), without
            `overwrite`.
    """
    advice = "Use another output folder or overwrite it (`overwrite=True`, evaluate.py's --overwrite)."
    try:
        with open(path) as file:
            records = json.load(file)
        recorded = dict(records["identity"])
        dict(records["batches"])
    except (ValueError, KeyError, TypeError) as error:
        if overwrite:
            return None
        raise EvaluationError(f"{path} cannot be read ({error}), so {what} cannot be resumed. {advice}") from None
    differing = differing_keys(identity, recorded)
    if differing == [WEIGHTS_KEY] and WEIGHTS_KEY not in recorded:
        # Written before the identity recorded the weights: the arguments match, the weights cannot be checked.
        logger.warning(
            f"{what[0].upper()}{what[1:]} was made by an older version that did not record the weights, so it cannot "
            "be checked that it comes from this pipeline's weights. It is resumed as this pipeline's; if it is not, run "
            "again with --overwrite. Recording the fingerprint now."
        )
        records["identity"] = identity
    elif differing:
        if overwrite:
            return None
        raise EvaluationError(
            f"{what[0].upper()}{what[1:]} does not belong to this run: {mismatch_reason(identity, recorded, differing)}. "
            f"To resume it use the same pipeline and arguments. {advice}"
        )
    return records


def _load_or_reset_manifest(
    output_dir: Path, manifest_path: Path, identity: Dict[str, Any], overwrite: bool
) -> Dict[str, Any]:
    """The dump's manifest if it matches `identity`; a fresh one (after clearing the old dump if `overwrite`)
    otherwise."""
    existing_samples = [path for path in output_dir.iterdir() if _SAMPLE_NAME.match(path.name)]
    manifest = None
    if manifest_path.exists():
        manifest = load_run_records(manifest_path, identity, overwrite, f"the sample dump in {output_dir}")
    elif existing_samples and not overwrite:
        raise EvaluationError(
            f"{output_dir} holds {len(existing_samples)} PNG samples but no {MANIFEST_NAME}, so they cannot be resumed. "
            "Use another output folder or overwrite them (`overwrite=True`, evaluate.py's --overwrite)."
        )
    if manifest is None:
        for path in existing_samples:
            path.unlink()
        manifest = {"identity": identity, "batches": {}}
        write_json_atomically(manifest, manifest_path)
    return manifest


def dump_files(output_dir: Union[str, os.PathLike]) -> Optional[List[Path]]:
    """The image files of the sample dump in `output_dir`, from its manifest; `None` if it has no manifest.

    Only these files are the dump: other images in the folder are not part of it.

    Raises:
        EvaluationError: if the dump is unfinished (a batch not recorded, or a file missing).
    """
    manifest_path = Path(output_dir) / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    with open(manifest_path) as file:
        manifest = json.load(file)
    identity = manifest["identity"]
    num_samples, batch_size = identity["num_samples"], identity["batch_size"]
    files = [Path(output_dir) / name for name in sample_file_names(num_samples)]
    missing_batches = [
        index for index in range(-(-num_samples // batch_size)) if str(index) not in manifest["batches"]
    ]
    missing_files = [path.name for path in files if not path.is_file()]
    if missing_batches or missing_files:
        raise EvaluationError(
            f"The sample dump in {output_dir} is unfinished ({len(missing_batches)} batch(es) not recorded, "
            f"{len(missing_files)} file(s) missing): run `generate_samples` (evaluate.py) again with the same "
            "arguments to finish it."
        )
    return files


def configure_scheduler(pipeline, **config_overrides):
    """Replaces `pipeline.scheduler` by one of the same class with some configuration values changed.

    Args:
        pipeline: a pipeline with a `scheduler` (a diffusers `SchedulerMixin` / `ConfigMixin`).
        **config_overrides: configuration keys and their new values (`snr`, `corrector`, `predictor`, ...); `None`
            values are ignored.

    Returns:
        The pipeline, modified in place.

    Raises:
        ValueError: if a key is not in the scheduler's configuration.
    """
    overrides = {key: value for key, value in config_overrides.items() if value is not None}
    if not overrides:
        return pipeline
    scheduler = pipeline.scheduler
    unknown = sorted(set(overrides) - set(scheduler.config))
    if unknown:
        raise ValueError(
            f"{type(scheduler).__name__} has no configuration key(s) {unknown}; "
            f"known keys: {sorted(k for k in scheduler.config if not k.startswith('_'))}."
        )
    pipeline.scheduler = type(scheduler).from_config(scheduler.config, **overrides)
    return pipeline
