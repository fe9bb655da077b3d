"""Sample generation (resumable, sharded across processes under `accelerate launch`) and torch-fidelity metrics for
DiNof pipelines (offline digits and DINOv2 feature extractors), the bits per dimension of a data set (flow prior and SDE prior side by side), and the flow-gain / headroom
diagnostic."""

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
from .distributed import run_on_main_process, run_sharded_batches
from .errors import EvaluationError
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
from .likelihood import (
    LIKELIHOOD_PRIORS,
    LikelihoodResult,
    evaluate_likelihood,
    likelihood_images,
    resumable_likelihood,
)
from .metrics import (
    SUPPORTED_METRICS,
    compute_metrics,
    dataset_reference_folder,
    default_feature_extractor,
    digits_reference_folder,
    is_digits_reference,
    prepare_metrics,
    registered_feature_extractors,
    resolve_reference,
)
from .sample_dump import (
    batch_seed,
    configure_scheduler,
    dump_files,
    generate_samples,
    weights_fingerprint,
)

register_digits_feature_extractor()
register_dinov2_feature_extractors()

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "DINOV2_FEATURE_EXTRACTOR_NAME",
    "DINOV2_MODEL_IDS",
    "LIKELIHOOD_PRIORS",
    "SUPPORTED_METRICS",
    "DigitsClassifier",
    "EvaluationError",
    "Estimate",
    "FlowGainResult",
    "LikelihoodResult",
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
    "evaluate_likelihood",
    "digits_reference_folder",
    "dump_files",
    "flow_gain",
    "generate_samples",
    "images_to_tensor",
    "is_digits_reference",
    "likelihood_images",
    "load_digits_classifier",
    "load_dinov2_model",
    "mean_estimate",
    "mixture_log_prob",
    "prepare_metrics",
    "preprocess_dinov2",
    "prior_log_prob",
    "register_digits_feature_extractor",
    "register_dinov2_feature_extractors",
    "registered_feature_extractors",
    "resolve_reference",
    "resumable_likelihood",
    "run_on_main_process",
    "run_sharded_batches",
    "train_digits_classifier",
    "weights_fingerprint",
]
