import pytest
import torch


@pytest.fixture
def one_thread():
    """One CPU thread for a test of tiny models: two threads cost more in waiting on each other than
    they save, and many times more on a machine whose cores are busy. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
