"""Fixtures every test gets; shared helpers live in ``helpers.py`` (``tests/`` is on the path)."""

import os

import pytest
import torch


def xdist_workers() -> int:
    """How many pytest-xdist workers share the machine (``make test`` runs one per core); 1 alone."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def threads_per_worker() -> int:
    """The machine's cores shared among pytest-xdist's workers."""
    return max(1, (os.cpu_count() or 1) // xdist_workers())


def pytest_configure(config: pytest.Config) -> None:
    """Each worker's thread share, set before any fixture runs: module fixtures (a pretraining run)
    are built before a test's function fixtures, and a thread count set there came too late for
    them (a fresh worker built them with every core, and a result moved with the thread count:
    the mean-teacher check's labels-only baseline scored 0.787 on 2 threads, 0.763 on 1).
    The processes a test starts (CLI and suite runs, DDP ranks) get the share too, through
    ``OMP_NUM_THREADS``: by default each would take every core beside the other worker's thread,
    and OpenMP threads that outnumber the cores wait on each other (measured: two suite-runner
    tests beside another job took 191 s, 63 s with this). Alone, the variable is left to the user
    and to Lightning, which divides the cores among the DDP ranks it starts."""
    threads = threads_per_worker()
    torch.set_num_threads(threads)
    if xdist_workers() > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture
def one_thread():
    """One torch thread, for modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    a second thread only adds synchronisation, which costs seconds when other jobs share the cores."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads_per_worker())


#: Module fixtures that spawn a 2-rank process group or run a whole pretraining: the tests that use
#: them are slow (``make test-fast`` leaves them out).
SLOW_FIXTURES = {"ranks", "digits_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
