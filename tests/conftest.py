import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' tensors are tiny: one intra-op thread is as fast, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
