"""Test configuration.

Without a GPU, Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` is set here,
before any forgetkern kernel module is imported (Triton fixes the mode when a kernel is defined).
Tests marked ``gpu`` skip without a CUDA device.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
