"""The DINOv2 feature extractor for torch-fidelity, offline: a tiny random Dinov2Model saved to a folder goes through
the same loading path as a Hub id."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from transformers import Dinov2Model

from dinof_diffusers.evaluation import (
    DINOV2_FEATURE_EXTRACTOR_NAME,
    DINOV2_MODEL_IDS,
    FeatureExtractorDinov2HF,
    compute_metrics,
    preprocess_dinov2,
)

HIDDEN = 8  # the hidden size of the `tiny_dinov2_dir` fixture (conftest.py)


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Two folders of 40 images: 8x8 RGB noise, and 8x8 greyscale gradients with noise."""
    rng = np.random.RandomState(0)
    noise, ramps = tmp_path_factory.mktemp("noise"), tmp_path_factory.mktemp("ramps")
    for index in range(40):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(noise / f"{index:03d}.png")
        ramp = np.clip(np.linspace(0, 255, 8)[None, :] * rng.uniform(0.5, 1) + rng.normal(0, 20, (8, 8)), 0, 255)
        Image.fromarray(ramp.astype(np.uint8)).save(ramps / f"{index:03d}.png")
    return noise, ramps


def test_registered_and_preprocessed_like_stein_et_al():
    assert DINOV2_FEATURE_EXTRACTOR_NAME == "dinov2-hf-vit-l-14"
    assert DINOV2_MODEL_IDS[DINOV2_FEATURE_EXTRACTOR_NAME] == "facebook/dinov2-large"
    for name in DINOV2_MODEL_IDS:
        assert FEATURE_EXTRACTORS_REGISTRY[name] is FeatureExtractorDinov2HF
    # a constant image stays constant through the bicubic resize: exactly ImageNet's normalisation of its value
    grey = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    pixels = preprocess_dinov2(grey)
    assert pixels.shape == (2, 3, 224, 224)
    expected = (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[:, :, 100, 37], expected.expand(2, 3))
    # grey is RGB with equal channels; alpha is dropped
    image = torch.randint(0, 256, (1, 1, 10, 12), dtype=torch.uint8)
    torch.testing.assert_close(preprocess_dinov2(image), preprocess_dinov2(image.expand(-1, 3, -1, -1)))
    rgba = torch.randint(0, 256, (1, 4, 10, 12), dtype=torch.uint8)
    torch.testing.assert_close(preprocess_dinov2(rgba), preprocess_dinov2(rgba[:, :3]))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_dinov2(torch.zeros(1, 3, 8, 8))


def test_features_are_the_class_token(tiny_dinov2_dir):
    extractor = FeatureExtractorDinov2HF(
        DINOV2_FEATURE_EXTRACTOR_NAME, ["dinov2"], feature_extractor_weights_path=str(tiny_dinov2_dir)
    )
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    (features,) = extractor(images)
    assert features.shape == (3, HIDDEN) and features.dtype == torch.float32
    model = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    with torch.no_grad():
        hidden = model(pixel_values=preprocess_dinov2(images)).last_hidden_state  # after the final LayerNorm
    torch.testing.assert_close(features, hidden[:, 0])
    # one image's features do not depend on its batch
    torch.testing.assert_close(extractor(images[1:2])[0], features[1:2], rtol=1e-5, atol=1e-5)


def frechet_distance(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_through_torch_fidelity(tiny_dinov2_dir, image_folders, tmp_path):
    noise, ramps = image_folders
    kwargs = dict(
        feature_extractor=DINOV2_FEATURE_EXTRACTOR_NAME,
        metrics=("fid",),
        cuda=False,
        cache_dir=tmp_path,
        feature_extractor_weights_path=str(tiny_dinov2_dir),
    )
    distance = compute_metrics(noise, reference=ramps, **kwargs)["frechet_inception_distance"]
    assert compute_metrics(noise, reference=noise, **kwargs)["frechet_inception_distance"] == pytest.approx(
        0.0, abs=1e-6
    )

    extractor = FeatureExtractorDinov2HF(
        DINOV2_FEATURE_EXTRACTOR_NAME, ["dinov2"], feature_extractor_weights_path=str(tiny_dinov2_dir)
    )

    def features(folder):
        images = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))]
        return extractor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))[0].double().numpy()

    assert distance > 0.01
    assert distance == pytest.approx(frechet_distance(features(noise), features(ramps)), rel=1e-3)
