"""Fixtures of the reliability suite (helpers live in relharness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from relharness import RawClient, WorkerProc


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProc]:
    """One shared worker on the fixture checkpoint (most tests only need it to keep serving)."""
    w = WorkerProc("--max-queue", "8", "--max-message-bytes", str(16 << 20)).start()
    w.wait_ready()
    yield w
    w.stop()


@pytest.fixture()
def raw(worker: WorkerProc) -> Iterator[RawClient]:
    with worker.raw() as r:
        yield r
