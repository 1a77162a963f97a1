"""Shared fixtures: ``cpu_backend`` runs a test once per operator backend available on the CPU."""

import pytest
import torch

from dcnbench.ops import use_backend
from dcnbench.ops.dispatch import backend_status

CPU_BACKENDS = ("reference", "native")


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Force each CPU backend in turn; skip one that is unavailable here (with its reason)."""
    ok, why = backend_status(request.param)
    if not ok:
        pytest.skip(f"{request.param} backend unavailable: {why}")
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
