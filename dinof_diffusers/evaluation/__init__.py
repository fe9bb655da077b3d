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
from .dinov2 import (
    DINOV2_FEATURE_EXTRACTOR_NAME,
    DINOV2_MODEL_IDS,
    FeatureExtractorDinov2HF,
    load_dinov2_model,
    preprocess_dinov2,
    register_dinov2_feature_extractors,
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
register_dinov2_feature_extractors()

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "DINOV2_FEATURE_EXTRACTOR_NAME",
    "DINOV2_MODEL_IDS",
    "SUPPORTED_METRICS",
    "DigitsClassifier",
    "Estimate",
    "FlowGainResult",
    "FeatureExtractorDigits",
    "FeatureExtractorDinov2HF",
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
    "load_dinov2_model",
    "mean_estimate",
    "mixture_log_prob",
    "preprocess_dinov2",
    "prior_log_prob",
    "register_digits_feature_extractor",
    "register_dinov2_feature_extractors",
    "resolve_reference",
    "train_digits_classifier",
]
