"""Sample generation and torch-fidelity metrics for DiNof pipelines, with an offline digits feature extractor."""

from .digits_classifier import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DigitsClassifier,
    FeatureExtractorDigits,
    default_cache_dir,
    digits_classifier_info,
    load_digits_classifier,
    register_digits_feature_extractor,
    train_digits_classifier,
)
from .metrics import (
    SUPPORTED_METRICS,
    batch_seed,
    compute_metrics,
    configure_scheduler,
    dataset_reference_folder,
    default_feature_extractor,
    digits_reference_folder,
    generate_samples,
    resolve_reference,
)

register_digits_feature_extractor()

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "SUPPORTED_METRICS",
    "DigitsClassifier",
    "FeatureExtractorDigits",
    "batch_seed",
    "compute_metrics",
    "configure_scheduler",
    "dataset_reference_folder",
    "default_cache_dir",
    "default_feature_extractor",
    "digits_classifier_info",
    "digits_reference_folder",
    "generate_samples",
    "load_digits_classifier",
    "register_digits_feature_extractor",
    "resolve_reference",
    "train_digits_classifier",
]
