"""Fixtures for the worker tests: a shared real worker process on the tiny checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from workerlib import WorkerProc, start_worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[WorkerProc]:
    """One shared worker per test module: 80 MB size limit, 2 queue slots, model view <= 256 px."""
    wp = start_worker(tmp_path_factory.mktemp("worker"), "--max-message-bytes", "80000000", "--max-queue", "2",
                      "--max-side", "256")
    yield wp
    wp.stop()
