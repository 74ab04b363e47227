"""Suite-wide pytest configuration: the async backend and the hypothesis profiles."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
