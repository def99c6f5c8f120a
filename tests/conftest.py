import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core CPU two OpenMP threads make
    a decode step 10-50x slower (they wait for each other's core). Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
