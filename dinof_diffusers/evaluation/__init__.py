"""Sample generation and torch-fidelity metrics for DiNof pipelines (offline digits and DINOv2 feature extractors),
and the flow-gain / headroom diagnostic."""

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
from .flow_gain import (
    Estimate,
    FlowGainResult,
    diffuse_images,
    flow_gain,
    images_to_tensor,
    mean_estimate,
    mixture_log_prob,
    prior_log_prob,
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
    "Estimate",
    "FlowGainResult",
    "FeatureExtractorDigits",
    "batch_seed",
    "compute_metrics",
    "configure_scheduler",
    "dataset_reference_folder",
    "default_cache_dir",
    "default_feature_extractor",
    "digits_classifier_info",
    "diffuse_images",
    "digits_reference_folder",
    "flow_gain",
    "generate_samples",
    "images_to_tensor",
    "load_digits_classifier",
    "mean_estimate",
    "mixture_log_prob",
    "prior_log_prob",
    "register_digits_feature_extractor",
    "resolve_reference",
    "train_digits_classifier",
]
