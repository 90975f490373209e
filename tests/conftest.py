"""Test setup: without a GPU, Triton kernels run through the interpreter (TRITON_INTERPRET=1).

This must happen before triton is imported anywhere, hence at conftest import time.
Tests marked `gpu` need CUDA and run on the device machine (`pytest -m gpu`).
"""
import os

# The interpreter's tl.dot is numpy matmul: OpenBLAS threads thrash on a 2-core machine (~100x slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Unseeded draws get a seed derived from the test's own id: random data, reproducible, and independent
    of which tests ran before (a test's inputs used to change when tests were added before it)."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
