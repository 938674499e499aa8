import os
import sys

# tests/toy.py (exact denoisers) is shared by several test files
sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use small tensors: one thread is fastest, and does not fight other processes for the cores.
    (Tests that compare runs bit for bit run them with the same thread count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
