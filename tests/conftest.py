"""Fixtures every test gets; shared helpers live in ``helpers.py`` (``tests/`` is on the path)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_pairs():
    """Two torch threads: the CI machine has two cores, and tests run one at a time."""
    torch.set_num_threads(2)
    yield
