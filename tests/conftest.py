"""Suite-wide settings: tiny models run fastest on one thread, runs stay repeatable, and nothing reaches
for the network (a name that is no local folder fails at once instead of retrying a hub download)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
