import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' tensors are tiny: one intra-op thread is as fast, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_tiny_pipeline_dir(tmp_path_factory, single_thread):
    """A folder holding the tiny pipeline of tests/trained_pipeline.py, trained once per session (a few seconds).

    Load it with `DiNofPipeline.from_pretrained(trained_tiny_pipeline_dir)`; never write into it.
    """
    from trained_pipeline import train_tiny_pipeline

    path = tmp_path_factory.mktemp("trained_tiny_pipeline")
    train_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny randomly initialised `Dinov2Model` (hidden size 8) saved to a folder: it loads through the same path as
    a Hub id (`feature_extractor_weights_path`), offline."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
    )
    path = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(config).save_pretrained(path)
    return path
