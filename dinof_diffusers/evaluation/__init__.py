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

register_digits_feature_extractor()

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "DigitsClassifier",
    "FeatureExtractorDigits",
    "default_cache_dir",
    "digits_classifier_info",
    "load_digits_classifier",
    "register_digits_feature_extractor",
    "train_digits_classifier",
]
