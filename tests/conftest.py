"""Fixtures every test gets; shared helpers live in ``helpers.py`` (``tests/`` is on the path)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_pairs():
    """Two torch threads: the CI machine has two cores, and tests run one at a time."""
    torch.set_num_threads(2)
    yield


#: Module fixtures that spawn a 2-rank process group or run a whole pretraining: the tests that use
#: them are slow (``make test-fast`` leaves them out).
SLOW_FIXTURES = {"ranks", "digits_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
