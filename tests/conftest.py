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


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium for the browser tests (tests/test_web_browser.py): installed with apt-get when it is
    missing and we are root (a browser that downloads itself cannot be had here). Returns its path."""
    import shutil
    import subprocess

    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, capture_output=True)
        path = shutil.which("chromium")
    if path is None:
        pytest.fail("the browser tests need Debian's chromium: run `apt-get install -y chromium` as root")
    return path
