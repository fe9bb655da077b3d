"""Resumable sample dumps and torch-fidelity metrics (FID, Inception / classifier-confidence score, KID, PRC).

`generate_samples` writes a pipeline's samples as PNGs in batches; `compute_metrics` compares such a folder with a
reference through `torch_fidelity.calculate_metrics`, with either torch-fidelity's Inception-v3 (the paper's
metrics; its weights are downloaded by torch-fidelity on first use) or the offline `"dinof-digits"` classifier.
"""

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..config_utils import public_config
from ..file_utils import atomic_folder_path, remove_temporary_files, write_json_atomically
from ..image_utils import save_image_atomically
from ..validation import check_int, check_positive_int
from .digits_classifier import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    default_cache_dir,
    default_classifier_path,
    register_digits_feature_extractor,
)
from .dinov2 import register_dinov2_feature_extractors

MANIFEST_NAME = "generation.json"
SUPPORTED_METRICS = ("fid", "isc", "kid", "prc")
INCEPTION_FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
DIGITS_REFERENCE = "digits"
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SAMPLE_NAME = re.compile(r"^\d+\.png$")


# ----------------------------------------------------------------------------------------------------------------
# Sample generation
# ----------------------------------------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch `batch_index` of a dump seeded with `seed`: independent of the batches before it."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint32)[0])


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON data (tensors, numpy scalars, tuples, paths and unknown objects via `repr`)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
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


def _scheduler_config(pipeline) -> Optional[Dict[str, Any]]:
    config = getattr(getattr(pipeline, "scheduler", None), "config", None)
    return None if config is None else _jsonable(public_config(config))


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


def sample_file_names(num_samples: int) -> List[str]:
    """The file names of a dump of `num_samples` images: zero-padded indices, `000000.png`, ..."""
    width = max(6, len(str(num_samples - 1)))
    return [f"{index:0{width}d}.png" for index in range(num_samples)]


def generate_samples(
    pipeline,
    output_dir: Union[str, os.PathLike],
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
    **sampler_kwargs,
) -> Dict[str, Any]:
    """Generates `num_samples` images with `pipeline` and stores them as PNGs, resumably.

    Batch b holds the images b * batch_size, ... (the last batch may be smaller) and is drawn with a CPU
    `torch.Generator` seeded by `batch_seed(seed, b)`, so every batch can be redone on its own. A batch whose
    PNGs all exist and whose statistics are recorded in `output_dir/generation.json` is skipped; any other batch is
    generated again and its missing files are written. A dump interrupted at any point and run again with the same
    arguments is therefore byte-identical to an uninterrupted one (for a pipeline that is deterministic given its
    generator, on the same device and software; e.g. on CPU). The manifest records the arguments, the sampler
    keywords and the scheduler configuration: resuming with different ones is refused. Each PNG and the manifest are
    written atomically (temporary file + rename); temporary files left by a killed run are removed.

    Args:
        pipeline: a `DiNofPipeline` (or any callable with the same signature): called as
            `pipeline(batch_size=..., generator=..., output_type="pt", **sampler_kwargs)` and returning an object
            with `.images` ((B, C, H, W) in [0, 1]) and `.nfe` (network evaluations per sample).
        output_dir: the folder of the PNGs and of `generation.json`.
        num_samples: number of images.
        batch_size: images per pipeline call.
        seed: the dump's seed.
        overwrite: delete an existing dump in `output_dir` made with other arguments instead of raising.
        show_progress: show a progress bar over the images (the pipeline's own bar is silenced meanwhile, and set
            back to its default afterwards, through `set_progress_bar_config`).
        **sampler_kwargs: passed to every pipeline call (`num_inference_steps`, `use_flow_prior`,
            `flow_temperature`, ...).

    Returns:
        A dict with `output_dir`, `num_samples`, `num_generated` (images generated by this call), `nfe` (mean NFE
        per image over all batches), `seconds_per_image` (mean wall-clock seconds per image over all batches, the
        pipeline call and the transfer to the CPU, from every run that contributed), `files` (the PNG paths).

    Raises:
        ValueError: on bad arguments, or when `output_dir` holds a dump made with other arguments (or PNGs without
            a manifest) and `overwrite` is False.
    """
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    check_int(seed, "seed", minimum=0)
    for reserved in ("batch_size", "generator", "output_type", "return_dict"):
        if reserved in sampler_kwargs:
            raise ValueError(f"`{reserved}` is set by `generate_samples` and cannot be a sampler keyword.")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = sample_file_names(num_samples)
    identity = _jsonable(
        {
            "num_samples": num_samples,
            "batch_size": batch_size,
            "seed": seed,
            "sampler_kwargs": sampler_kwargs,
            "scheduler_config": _scheduler_config(pipeline),
        }
    )
    manifest_path = output_dir / MANIFEST_NAME
    manifest = _load_or_reset_manifest(output_dir, manifest_path, identity, overwrite)
    remove_temporary_files(output_dir)  # the halves of a killed run's atomic writes

    num_batches = -(-num_samples // batch_size)
    batches = manifest["batches"]
    todo = [
        index
        for index in range(num_batches)
        if str(index) not in batches
        or not all((output_dir / name).exists() for name in names[index * batch_size : (index + 1) * batch_size])
    ]
    num_done = num_samples - sum(len(names[i * batch_size : (i + 1) * batch_size]) for i in todo)

    silence = getattr(pipeline, "set_progress_bar_config", None)
    if silence is not None:
        silence(disable=True)
    num_generated = 0
    try:
        with tqdm(
            total=num_samples, initial=num_done, unit="img", desc="Generating", disable=not show_progress
        ) as bar:
            for index in todo:
                batch_names = names[index * batch_size : (index + 1) * batch_size]
                generator = torch.Generator(device="cpu").manual_seed(batch_seed(seed, index))
                start = time.perf_counter()
                output = pipeline(batch_size=len(batch_names), generator=generator, output_type="pt", **sampler_kwargs)
                images = _to_uint8_images(output.images)
                seconds = time.perf_counter() - start
                if len(images) != len(batch_names):
                    raise RuntimeError(
                        f"The pipeline returned {len(images)} images for a batch of {len(batch_names)}."
                    )
                for name, image in zip(batch_names, images):
                    save_image_atomically(Image.fromarray(image), output_dir / name)
                nfe = getattr(output, "nfe", None)
                batches[str(index)] = {
                    "num_images": len(batch_names),
                    "nfe": _jsonable(nfe),
                    "seconds": seconds,
                }
                write_json_atomically(manifest, manifest_path)
                num_generated += len(batch_names)
                bar.update(len(batch_names))
    finally:
        if silence is not None:
            silence()  # the default bar again

    records = [batches[str(index)] for index in range(num_batches)]
    total_images = sum(record["num_images"] for record in records)
    nfes = [record["nfe"] for record in records if isinstance(record["nfe"], (int, float))]
    return {
        "output_dir": str(output_dir),
        "num_samples": num_samples,
        "num_generated": num_generated,
        "nfe": float(np.mean(nfes)) if nfes else None,
        "seconds_per_image": sum(record["seconds"] for record in records) / total_images,
        "files": [str(output_dir / name) for name in names],
    }


def _load_or_reset_manifest(
    output_dir: Path, manifest_path: Path, identity: Dict[str, Any], overwrite: bool
) -> Dict[str, Any]:
    """The dump's manifest if it matches `identity`; a fresh one (after clearing the old dump if `overwrite`)
    otherwise."""
    existing_samples = [path for path in output_dir.iterdir() if _SAMPLE_NAME.match(path.name)]
    manifest = None
    if manifest_path.exists():
        with open(manifest_path) as file:
            manifest = json.load(file)
        if manifest.get("identity") != identity:
            differing = sorted(
                key
                for key in set(identity) | set(manifest.get("identity", {}))
                if identity.get(key) != manifest.get("identity", {}).get(key)
            )
            if not overwrite:
                raise ValueError(
                    f"{output_dir} holds a sample dump made with other arguments (differing: {', '.join(differing)}). "
                    "Use another output folder, the same arguments to resume, or `overwrite=True`."
                )
            manifest = None
    elif existing_samples and not overwrite:
        raise ValueError(
            f"{output_dir} holds {len(existing_samples)} PNG samples but no {MANIFEST_NAME}, so they cannot be resumed. "
            "Use another output folder or `overwrite=True`."
        )
    if manifest is None:
        for path in existing_samples:
            path.unlink()
        manifest = {"identity": identity, "batches": {}}
        write_json_atomically(manifest, manifest_path)
    return manifest


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


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def _list_images(folder: Union[str, os.PathLike]) -> List[Path]:
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and path.suffix.lower() in _IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _image_resolution(folder: Union[str, os.PathLike]) -> int:
    images = _list_images(folder)
    if not images:
        raise ValueError(f"No PNG/JPEG images in {folder}.")
    with Image.open(images[0]) as image:
        return max(image.size)


def _write_image_folder_atomically(folder: Path, images: Iterable[Image.Image], show_progress: bool = False) -> Path:
    """Writes `images` as `000000.png`, ... into a fresh temporary folder and renames it to `folder` (if no other
    process got there first)."""
    if folder.exists():
        return folder
    with atomic_folder_path(folder, if_exists="keep") as temporary:
        for index, image in enumerate(tqdm(images, desc=f"Writing {folder.name}", disable=not show_progress)):
            image.save(os.path.join(temporary, f"{index:06d}.png"))
    return folder


def digits_reference_folder(
    resolution: Optional[int] = None, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> Path:
    """The 1,797 embedded digits as PNGs (mode "L"), cached under `cache_dir/references/`.

    Args:
        resolution: side length (PIL bilinear, as `dinof_diffusers.data.digits_images`); `None` keeps 8x8.
        cache_dir: default `default_cache_dir()`.

    Returns:
        The folder.
    """
    from ..data import digits_images

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / "references" / f"digits-r{resolution or 8}"
    if folder.exists():
        return folder
    images = digits_images(resolution)
    return _write_image_folder_atomically(folder, (Image.fromarray(image, mode="L") for image in images))


def dataset_reference_folder(
    dataset,
    resolution: Optional[int] = None,
    split: Optional[str] = None,
    config_name: Optional[str] = None,
    image_column: Optional[str] = None,
    max_samples: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = False,
) -> Path:
    """Writes the images of a `datasets` data set into a cached folder of PNGs.

    Args:
        dataset: a `datasets.Dataset`, a folder written by `Dataset.save_to_disk`, or a name for
            `datasets.load_dataset`, optionally as `"name:split"`.
        resolution: if given, every image is centre-cropped to a square and resized (bicubic) to this side length.
        split: the split to load (default: `"train"`, or the one in `"name:split"`).
        config_name: the data set configuration, for `load_dataset`.
        image_column: the column of the images (default: the first `datasets.Image` column, else `image` / `img`).
        max_samples: only the first `max_samples` images.
        cache_dir: default `default_cache_dir()`; the folder is `cache_dir/references/datasets/<name>-<fingerprint>`.
        show_progress: a progress bar while writing.

    Returns:
        The folder.
    """
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        if os.path.isdir(name):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split or "train"]
        else:
            if split is None and ":" in name:
                name, split = name.rsplit(":", 1)
            loaded = datasets.load_dataset(name, config_name, split=split or "train")
        label = f"{name}-{config_name or 'default'}-{split or 'train'}"
    else:
        loaded = dataset
        label = "dataset"
    if image_column is None:
        image_columns = [key for key, feature in loaded.features.items() if isinstance(feature, datasets.Image)]
        candidates = image_columns + [key for key in ("image", "img") if key in loaded.column_names]
        if not candidates:
            raise ValueError(f"No image column in the reference data set; columns: {loaded.column_names}.")
        image_column = candidates[0]
    elif image_column not in loaded.column_names:
        raise ValueError(f"The reference data set has no column {image_column!r}; columns: {loaded.column_names}.")
    if max_samples is not None:
        loaded = loaded.select(range(min(max_samples, len(loaded))))
    fingerprint = getattr(loaded, "_fingerprint", None) or "nofingerprint"
    key = hashlib.sha256(f"{label}|{fingerprint}|{image_column}|{resolution}|{len(loaded)}".encode()).hexdigest()[:16]
    safe_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / "references" / "datasets" / f"{safe_label}-{key}"
    if folder.exists():
        return folder

    def images():
        for image in loaded.select_columns([image_column]):
            image = image[image_column]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            if resolution is not None and image.size != (resolution, resolution):
                image = ImageOps.fit(image, (resolution, resolution), method=Image.BICUBIC)
            yield image

    return _write_image_folder_atomically(folder, images(), show_progress=show_progress)


def resolve_reference(
    reference,
    resolution: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    **dataset_kwargs,
) -> Union[str, Path]:
    """What torch-fidelity gets as the reference input.

    Args:
        reference: `"digits"` (the embedded digits, written as PNGs at `resolution`); a torch-fidelity registered
            input name (`"cifar10-train"`, ...: passed through, torch-fidelity downloads and caches it); a folder of
            images (passed through); a folder written by `Dataset.save_to_disk`, a `datasets.Dataset`, or a
            `datasets.load_dataset` name, optionally `"name:split"` (written as PNGs at `resolution`).
        resolution: side length for the references this function writes.
        cache_dir: where written references are cached; default `default_cache_dir()`.
        **dataset_kwargs: `split`, `config_name`, `image_column`, `max_samples` for `dataset_reference_folder`.

    Returns:
        A registered input name or a folder.
    """
    from torch_fidelity.registry import DATASETS_REGISTRY

    if isinstance(reference, (str, os.PathLike)):
        name = os.fspath(reference)
        if name == DIGITS_REFERENCE:
            return digits_reference_folder(resolution, cache_dir)
        if name in DATASETS_REGISTRY:
            return name
        if os.path.isdir(name):
            if any((Path(name) / marker).exists() for marker in ("state.json", "dataset_dict.json")):
                return dataset_reference_folder(name, resolution=resolution, cache_dir=cache_dir, **dataset_kwargs)
            if not _list_images(name):
                raise ValueError(f"The reference folder {name} holds no PNG/JPEG images.")
            return Path(name)
    return dataset_reference_folder(reference, resolution=resolution, cache_dir=cache_dir, **dataset_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def default_feature_extractor(reference) -> str:
    """`"dinof-digits"` for the digits reference, torch-fidelity's `"inception-v3-compat"` otherwise."""
    return DIGITS_FEATURE_EXTRACTOR_NAME if reference == DIGITS_REFERENCE else INCEPTION_FEATURE_EXTRACTOR_NAME


def compute_metrics(
    samples_dir: Union[str, os.PathLike],
    reference=None,
    feature_extractor: Optional[str] = None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    batch_size: int = 64,
    cuda: Optional[bool] = None,
    reference_resolution: Optional[int] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    seed: int = 2020,
    verbose: bool = False,
    reference_kwargs: Optional[Dict[str, Any]] = None,
    **fidelity_kwargs,
) -> Dict[str, float]:
    """Computes torch-fidelity metrics of a folder of samples against a reference.

    Everything runs through `torch_fidelity.calculate_metrics`; this function only resolves the reference (see
    `resolve_reference`), registers the `"dinof-digits"` extractor and adapts the subset sizes to small sample
    counts: the KID subset size becomes min(kid_subset_size, #samples, #reference), the number of ISC splits at most
    #samples // 10 (at least 1), the PRC neighbourhood at most min(#samples, #reference) - 1.

    With `feature_extractor="dinof-digits"`, `inception_score_mean` / `_std` is the *classifier-confidence score*
    (the Inception score computed with the digit classifier's logits; in [1, 10]), also returned as
    `classifier_confidence_score_mean` / `_std`, and the FID / KID / PRC are computed on the classifier's 128
    penultimate features.

    Args:
        samples_dir: folder of generated images (input1; PNG/JPEG, all the same size).
        reference: the real images (input2; see `resolve_reference`); required for FID, KID and PRC.
        feature_extractor: `"inception-v3-compat"`, `"dinof-digits"`, `"dinov2-hf-vit-l-14"` (FD-DINOv2; another
            model id or folder via `feature_extractor_weights_path=...`) or any torch-fidelity registered extractor;
            default `default_feature_extractor(reference)`.
        metrics: a subset of `("fid", "isc", "kid", "prc")`; ISC is computed on the samples.
        batch_size: feature extraction batch size.
        cuda: run the extractor on the GPU; default: when one is available.
        reference_resolution: side length of the references written by `resolve_reference` (digits, data sets);
            default: the samples' side length.
        cache_dir: default `default_cache_dir()`: the written references, the digit classifier, and torch-fidelity's
            feature cache of registered inputs (`cache_dir/fidelity_cache`).
        kid_subset_size: KID subset size before adaptation.
        kid_subsets: number of KID subsets.
        isc_splits: number of ISC splits before adaptation.
        prc_neighborhood: PRC k-nearest-neighbour count before adaptation.
        seed: torch-fidelity's `rng_seed` (KID subsets, ISC shuffling).
        verbose: torch-fidelity's progress output.
        reference_kwargs: extra keywords for `resolve_reference` (`split`, `config_name`, `image_column`,
            `max_samples`).
        **fidelity_kwargs: further `torch_fidelity.calculate_metrics` keywords; they take precedence.

    Returns:
        torch-fidelity's dict: `frechet_inception_distance`, `inception_score_mean`, `inception_score_std`,
        `kernel_inception_distance_mean`, `kernel_inception_distance_std`, `precision`, `recall`, `f_score` (those of
        the requested metrics), plus the classifier-confidence aliases described above.
    """
    import torch_fidelity

    register_digits_feature_extractor()
    register_dinov2_feature_extractors()
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(SUPPORTED_METRICS))
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {SUPPORTED_METRICS}, got {metrics}.")
    binary = [metric for metric in metrics if metric != "isc"]
    if binary and reference is None:
        raise ValueError(f"The metrics {binary} need a `reference`.")
    samples = _list_images(samples_dir) if os.path.isdir(samples_dir) else []
    if not samples:
        raise ValueError(f"No PNG/JPEG samples in {samples_dir}.")
    leftovers = [path.name for path in Path(samples_dir).glob(".tmp-*") if path.suffix.lower() in _IMAGE_EXTENSIONS]
    if leftovers:  # torch-fidelity would count them as samples
        raise ValueError(
            f"{samples_dir} holds temporary files of an interrupted run ({leftovers[:3]}...); run `generate_samples` "
            "again to finish the dump (it removes them)."
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    feature_extractor = feature_extractor or default_feature_extractor(reference)
    if cuda is None:
        cuda = torch.cuda.is_available()

    num_samples = len(samples)
    kwargs = {
        "input1": str(samples_dir),
        "feature_extractor": feature_extractor,
        "batch_size": batch_size,
        "cuda": cuda,
        "isc": "isc" in metrics,
        "fid": "fid" in metrics,
        "kid": "kid" in metrics,
        "prc": "prc" in metrics,
        # At least 10 samples per split where possible (a split of one sample always scores exactly 1).
        "isc_splits": max(1, min(isc_splits, num_samples // 10)),
        "kid_subsets": kid_subsets,
        "rng_seed": seed,
        "verbose": verbose,
        "cache_root": str(cache_dir / "fidelity_cache"),
        # No DataLoader worker processes on the CPU: the images are small and workers cost more than they save.
        "save_cpu_ram": not cuda,
    }
    if feature_extractor == DIGITS_FEATURE_EXTRACTOR_NAME:
        kwargs["feature_extractor_weights_path"] = str(default_classifier_path(cache_dir))
    if reference is not None:
        resolution = reference_resolution or _image_resolution(samples_dir)
        resolved = resolve_reference(reference, resolution=resolution, cache_dir=cache_dir, **(reference_kwargs or {}))
        kwargs["input2"] = str(resolved)
        num_reference = len(_list_images(resolved)) if isinstance(resolved, Path) else None
        smallest = min(num_samples, num_reference) if num_reference is not None else num_samples
        if "kid" in metrics:
            if smallest < 2:
                raise ValueError(f"KID needs at least 2 samples and 2 reference images, got {smallest}.")
            kwargs["kid_subset_size"] = min(kid_subset_size, smallest)
        if "prc" in metrics:
            if smallest < 2:
                raise ValueError(f"Precision/recall need at least 2 samples and 2 reference images, got {smallest}.")
            kwargs["prc_neighborhood"] = max(1, min(prc_neighborhood, smallest - 1))
        if "fid" in metrics and smallest < 2:
            raise ValueError(f"FID needs at least 2 samples and 2 reference images, got {smallest}.")
    kwargs.update(fidelity_kwargs)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch_fidelity")
        result = dict(torch_fidelity.calculate_metrics(**kwargs))
    if feature_extractor == DIGITS_FEATURE_EXTRACTOR_NAME and "inception_score_mean" in result:
        result["classifier_confidence_score_mean"] = result["inception_score_mean"]
        result["classifier_confidence_score_std"] = result["inception_score_std"]
    return {key: float(value) for key, value in result.items()}
