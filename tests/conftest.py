"""Test configuration.

Without a GPU, Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` is set here,
before any forgetkern kernel module is imported (Triton fixes the mode when a kernel is defined).
Tests marked ``gpu`` skip without a CUDA device.
"""
import os

import pytest
import torch
from hypothesis import settings

# Deterministic fuzzing in the default run (CI must not flake); `--hypothesis-profile=fuzz` explores
# freshly random cases with a larger budget.
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("fuzz", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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
