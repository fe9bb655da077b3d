"""torch-fidelity metrics of sample dumps (FID, Inception / classifier-confidence score, KID, PRC), with one or several
feature extractors, and the references they compare with.

`compute_metrics` compares a dump (or any folder or list of images) with a reference through
`torch_fidelity.calculate_metrics`, with torch-fidelity's Inception-v3 (the paper's metrics; its weights are
downloaded by torch-fidelity on first use), the offline `"dinof-digits"` classifier, the DINOv2 extractors of
`dinov2.py` (FD-DINOv2) or any other registered extractor, several in one call. `prepare_metrics` fetches or checks
everything that needs (the extractors' weights, the reference and, for a torch-fidelity registered reference, its
cached features) before any sample is generated, so that a missing download fails at the start of a long run.
"""

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..file_utils import atomic_folder_path
from ..validation import check_choice
from .digits_classifier import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    default_cache_dir,
    default_classifier_path,
    register_digits_feature_extractor,
)
from .dinov2 import register_dinov2_feature_extractors
from .errors import EvaluationError
from .sample_dump import IMAGE_EXTENSIONS, dump_files, list_images

SUPPORTED_METRICS = ("fid", "isc", "kid", "prc")
INCEPTION_FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
DIGITS_REFERENCE = "digits"
PathOrName = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


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
    resolution: Optional[int] = None, cache_dir: Optional[Union[str, os.PathLike]] = None, split: str = "all"
) -> Path:
    """The embedded digits (all 1,797, or the "train" / "test" part of their fixed split) as PNGs (mode "L"), cached
    under `cache_dir/references/`.

    Args:
        resolution: side length (PIL bilinear, as `dinof_diffusers.data.digits_images`); `None` keeps 8x8.
        cache_dir: default `default_cache_dir()`.
        split: "all", "train" (1,500) or "test" (297), as `dinof_diffusers.data.digits_split_indices`.

    Returns:
        The folder.
    """
    from ..data import DIGITS_SPLITS, digits_images

    check_choice(split, "split", DIGITS_SPLITS)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = "digits" if split == "all" else f"digits-{split}"
    folder = cache_dir / "references" / f"{name}-r{resolution or 8}"
    if folder.exists():
        return folder
    images = digits_images(resolution, split=split)
    return _write_image_folder_atomically(folder, (Image.fromarray(image, mode="L") for image in images))


def is_digits_reference(reference) -> bool:
    """Whether `reference` names the embedded digits: "digits" or "digits:<split>"."""
    return isinstance(reference, str) and (
        reference == DIGITS_REFERENCE or reference.startswith(DIGITS_REFERENCE + ":")
    )


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
        reference: `"digits"` (the 1,797 embedded digits, written as PNGs at `resolution`), `"digits:train"` or
            `"digits:test"` (the 1,500 / 297 of their fixed split: the test digits are the held-out reference for
            a model trained on the train digits, train.py's default); a torch-fidelity registered
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
        if is_digits_reference(name):
            return digits_reference_folder(resolution, cache_dir, split=name.partition(":")[2] or "all")
        if name in DATASETS_REGISTRY:
            return name
        if os.path.isdir(name):
            if any((Path(name) / marker).exists() for marker in ("state.json", "dataset_dict.json")):
                return dataset_reference_folder(name, resolution=resolution, cache_dir=cache_dir, **dataset_kwargs)
            if not list_images(name):
                raise ValueError(f"The reference folder {name} holds no PNG/JPEG images.")
            return Path(name)
    return dataset_reference_folder(reference, resolution=resolution, cache_dir=cache_dir, **dataset_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def default_feature_extractor(reference) -> str:
    """`"dinof-digits"` for the digits reference, torch-fidelity's `"inception-v3-compat"` otherwise."""
    return DIGITS_FEATURE_EXTRACTOR_NAME if is_digits_reference(reference) else INCEPTION_FEATURE_EXTRACTOR_NAME


def registered_feature_extractors() -> List[str]:
    """The names torch-fidelity knows, ours ("dinof-digits", "dinov2-hf-vit-*-14") included."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register_digits_feature_extractor()
    register_dinov2_feature_extractors()
    return sorted(FEATURE_EXTRACTORS_REGISTRY)


def _check_metric_arguments(metrics: Sequence[str], reference, feature_extractors: Sequence[str]) -> None:
    unknown = sorted(set(metrics) - set(SUPPORTED_METRICS))
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {SUPPORTED_METRICS}, got {tuple(metrics)}.")
    binary = [metric for metric in metrics if metric != "isc"]
    if binary and reference is None:
        raise ValueError(f"The metrics {binary} need a `reference`.")
    known = registered_feature_extractors()
    unknown = [name for name in feature_extractors if name not in known]
    if unknown or not feature_extractors:
        raise ValueError(f"`feature_extractor` must be one or several of {known}, got {list(feature_extractors)}.")


def _extractor_kwargs(
    name: str, weights: Optional[Mapping[str, PathOrName]], cache_dir: Path, fidelity_kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """torch-fidelity's `feature_extractor_weights_path` for extractor `name`: from `weights`, from the caller's
    keywords, the cached digit classifier, or none (the extractor's own download)."""
    if weights and name in weights:
        return {"feature_extractor_weights_path": os.fspath(weights[name])}
    if "feature_extractor_weights_path" in fidelity_kwargs:
        return {"feature_extractor_weights_path": fidelity_kwargs["feature_extractor_weights_path"]}
    if name == DIGITS_FEATURE_EXTRACTOR_NAME:
        return {"feature_extractor_weights_path": str(default_classifier_path(cache_dir))}
    return {}


def _feature_layers(name: str, metrics: Sequence[str]) -> List[str]:
    """The features torch-fidelity extracts with `name` for `metrics` (the extractor's layer for each)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    extractor_class = FEATURE_EXTRACTORS_REGISTRY[name]
    return sorted({extractor_class.get_default_feature_layer_for_metric(metric) for metric in metrics})


def prepare_metrics(
    reference=None,
    feature_extractor: Union[str, Sequence[str], None] = None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    reference_resolution: Optional[int] = None,
    batch_size: int = 64,
    cuda: Optional[bool] = None,
    cache_dir: Optional[PathOrName] = None,
    feature_extractor_weights: Optional[Mapping[str, PathOrName]] = None,
    verbose: bool = False,
    reference_kwargs: Optional[Dict[str, Any]] = None,
    **fidelity_kwargs,
) -> None:
    """Fetches or checks what `compute_metrics` will need, so that it fails now rather than after the samples.

    Loads every feature extractor once (its weights are downloaded, or read from their cache or the given path),
    resolves the reference (`resolve_reference`: the digits and data sets are written to the cache) and, for a
    torch-fidelity registered reference such as `"cifar10-train"`, computes its features with each extractor into
    torch-fidelity's cache (downloading the data set if they are not cached yet), where `compute_metrics` finds
    them. Offline (`HF_HUB_OFFLINE=1`, no network) with something not cached, it raises an `EvaluationError` that
    says what is missing.

    Args:
        reference, feature_extractor, metrics, batch_size, cuda, cache_dir, feature_extractor_weights, verbose,
        reference_kwargs, **fidelity_kwargs: as for `compute_metrics`.
        reference_resolution: side length of the references written by `resolve_reference`: pass the samples'
            (`compute_metrics` defaults to it).

    Raises:
        EvaluationError: if an extractor, the reference or its features cannot be fetched.
    """
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    metrics = tuple(metrics)
    names = _extractor_names(feature_extractor, reference)
    _check_metric_arguments(metrics, reference, names)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    resolved = None
    if reference is not None and set(metrics) != {"isc"}:  # ISC is computed on the samples alone
        try:
            resolved = resolve_reference(
                reference, resolution=reference_resolution, cache_dir=cache_dir, **(reference_kwargs or {})
            )
        except EvaluationError:
            raise
        except Exception as error:
            raise EvaluationError(
                f"The reference {reference!r} could not be fetched ({type(error).__name__}: {error}). Offline, a "
                "data set must be in the datasets cache already."
            ) from error
    fidelity_cache = cache_dir / "fidelity_cache"
    for name in names:
        weights = _extractor_kwargs(name, feature_extractor_weights, cache_dir, fidelity_kwargs)
        try:
            extractor = create_feature_extractor(
                name, _feature_layers(name, metrics), cuda=cuda, verbose=verbose, **weights
            )
        except Exception as error:
            source = weights.get("feature_extractor_weights_path", "its default weights")
            raise EvaluationError(
                f"The feature extractor {name!r} could not be loaded from {source} ({type(error).__name__}: "
                f"{error}). Offline, its weights must be cached already (torch-fidelity's Inception in the torch "
                "hub cache, DINOv2 in the Hugging Face cache) or given as a local file or folder "
                "(evaluate.py's --feature_extractor_weights_path)."
            ) from error
        if isinstance(resolved, str):  # a torch-fidelity registered input: its features go to the cache
            try:
                extract_featuresdict_from_input_id_cached(
                    2,
                    extractor,
                    input2=resolved,
                    batch_size=batch_size,
                    cuda=cuda,
                    verbose=verbose,
                    cache_root=str(fidelity_cache),
                    save_cpu_ram=not cuda,
                    **{key: value for key, value in fidelity_kwargs.items() if key.startswith("datasets_")},
                )
            except Exception as error:
                raise EvaluationError(
                    f"The features of the reference {resolved!r} for {name!r} are not in the cache "
                    f"({fidelity_cache}) and computing them failed ({type(error).__name__}: {error}). If the data "
                    "set could not be downloaded: run once with network access, or copy the caches."
                ) from error
        del extractor


def _extractor_names(feature_extractor: Union[str, Sequence[str], None], reference) -> List[str]:
    if feature_extractor is None:
        return [default_feature_extractor(reference)]
    if isinstance(feature_extractor, str):
        return [feature_extractor]
    return list(dict.fromkeys(feature_extractor))


def _sample_files(samples) -> List[Path]:
    """The images to score: a dump's files (from its manifest), a folder's images, or the given paths."""
    if isinstance(samples, (str, os.PathLike)):
        if not os.path.isdir(samples):
            raise ValueError(f"No PNG/JPEG samples in {samples}: not a folder.")
        files = dump_files(samples)
        if files is None:
            leftovers = [p.name for p in Path(samples).glob(".tmp-*") if p.suffix.lower() in IMAGE_EXTENSIONS]
            if leftovers:
                raise ValueError(
                    f"{samples} holds temporary files of an interrupted run ({leftovers[:3]}...); run "
                    "`generate_samples` again to finish the dump (it removes them)."
                )
            files = list_images(samples)
    else:
        files = [Path(path) for path in samples]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise ValueError(f"{len(missing)} sample file(s) do not exist, e.g. {missing[0]}.")
    if not files:
        raise ValueError(f"No PNG/JPEG samples in {samples}.")
    return files


def compute_metrics(
    samples: Union[PathOrName, Sequence[PathOrName]],
    reference=None,
    feature_extractor: Union[str, Sequence[str], None] = None,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    batch_size: int = 64,
    cuda: Optional[bool] = None,
    reference_resolution: Optional[int] = None,
    cache_dir: Optional[PathOrName] = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    seed: int = 2020,
    verbose: bool = False,
    reference_kwargs: Optional[Dict[str, Any]] = None,
    feature_extractor_weights: Optional[Mapping[str, PathOrName]] = None,
    **fidelity_kwargs,
) -> Dict[str, Any]:
    """Computes torch-fidelity metrics of samples against a reference, with one or several feature extractors.

    Everything runs through `torch_fidelity.calculate_metrics`, once per extractor; this function only chooses the
    files (`samples`), resolves the reference (see `resolve_reference`), registers our extractors and adapts the
    subset sizes to small sample counts: the KID subset size becomes min(kid_subset_size, #samples, #reference),
    the number of ISC splits at most #samples // 10 (at least 1), the PRC neighbourhood at most
    min(#samples, #reference) - 1.

    With `feature_extractor="dinof-digits"`, `inception_score_mean` / `_std` is the *classifier-confidence score*
    (the Inception score computed with the digit classifier's logits; in [1, 10]), also returned as
    `classifier_confidence_score_mean` / `_std`, and the FID / KID / PRC are computed on the classifier's 128
    penultimate features. With a DINOv2 extractor, `frechet_inception_distance` is FD-DINOv2.

    Args:
        samples: the generated images (input1; PNG/JPEG, all the same size): a sample dump's folder (exactly the
            files its manifest lists: other images there are not scored; an unfinished dump is refused), another
            folder (its images), or a list of image files.
        reference: the real images (input2; see `resolve_reference`); required for FID, KID and PRC.
        feature_extractor: a name or a list of names: `"inception-v3-compat"`, `"dinof-digits"`,
            `"dinov2-hf-vit-l-14"` (FD-DINOv2), or any torch-fidelity registered extractor; default
            `default_feature_extractor(reference)`.
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
        feature_extractor_weights: extractor name -> its weights (a file, or for DINOv2 a folder or Hub id), given
            to torch-fidelity as `feature_extractor_weights_path`; default: each extractor's own (the digit
            classifier from the cache).
        **fidelity_kwargs: further `torch_fidelity.calculate_metrics` keywords; they take precedence.

    Returns:
        For one extractor (a name or `None`), torch-fidelity's dict: `frechet_inception_distance`,
        `inception_score_mean`, `inception_score_std`, `kernel_inception_distance_mean`,
        `kernel_inception_distance_std`, `precision`, `recall`, `f_score` (those of the requested metrics), plus the
        classifier-confidence aliases described above. For a list of extractors, `{name: that dict}`.
    """
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset

    metrics = tuple(metrics)
    names = _extractor_names(feature_extractor, reference)
    _check_metric_arguments(metrics, reference, names)
    files = _sample_files(samples)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cuda is None:
        cuda = torch.cuda.is_available()

    num_samples = len(files)
    kwargs = {
        "input1": ImagesPathDataset([str(path) for path in files]),
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
    if reference is not None and set(metrics) != {"isc"}:  # torch-fidelity would extract its features regardless
        if reference_resolution is None:
            with Image.open(files[0]) as image:
                reference_resolution = max(image.size)
        resolved = resolve_reference(
            reference, resolution=reference_resolution, cache_dir=cache_dir, **(reference_kwargs or {})
        )
        kwargs["input2"] = str(resolved)
        num_reference = len(list_images(resolved)) if isinstance(resolved, Path) else None
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

    results = {}
    for name in names:
        extractor_kwargs = {
            **kwargs,
            "feature_extractor": name,
            **fidelity_kwargs,
            **_extractor_kwargs(name, feature_extractor_weights, cache_dir, fidelity_kwargs),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch_fidelity")
            result = dict(torch_fidelity.calculate_metrics(**extractor_kwargs))
        if name == DIGITS_FEATURE_EXTRACTOR_NAME and "inception_score_mean" in result:
            result["classifier_confidence_score_mean"] = result["inception_score_mean"]
            result["classifier_confidence_score_std"] = result["inception_score_std"]
        results[name] = {key: float(value) for key, value in result.items()}
    if feature_extractor is None or isinstance(feature_extractor, str):
        return results[names[0]]
    return results
