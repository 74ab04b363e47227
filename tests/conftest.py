"""Suite-wide pytest configuration: the async backend and the hypothesis profiles."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test support modules import flat

import hypothesis_profiles  # noqa: F401 - registers and loads the profile for the run


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
