"""Fixtures shared by many test files (pytest finds them here without an import)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def handles() -> Iterator[list[Any]]:
    """DeepSpeed handles a test made (it appends them): destroyed after the test, so no engine
    outlives it (one process runs every test)."""
    made: list[Any] = []
    yield made
    for h in made:
        h.destroy()
