"""Test set-up shared by every test file.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The interpreter reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module imports
`kernels`. Tests marked `gpu` need a CUDA device (run them with `pytest -m gpu` on an H100/H200);
they are skipped only where no GPU exists, and run wherever one does.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a Hopper machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device a test marked `gpu` runs on, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
