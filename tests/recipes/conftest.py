"""Recipe tests: one torch thread per test process."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared by several test processes: one thread each is faster than oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
