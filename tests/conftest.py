import pytest

import pyconcepts  # noqa: F401  (before torch: its OpenMP threads then wait passively)
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # CUDA tests skip cleanly (with a reason) on machines without a usable GPU build.
    try:
        import pyconcepts

        have_cuda = pyconcepts.ops.cuda_available()
    except Exception:  # pragma: no cover - import errors surface in the tests themselves
        have_cuda = False
    if have_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and pyconcepts built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
