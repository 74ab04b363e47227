"""Suite-wide pytest configuration: the async backend and the hypothesis profiles."""

import pytest

import tests.support.hypothesis_profiles  # noqa: F401 - registers and loads the profile for the run


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
