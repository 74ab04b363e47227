"""Hypothesis profiles for merge testing: `ci`, `dev` and `long`.

- `ci`: derandomized (the same examples on every run, so CI never flakes on a new seed), no
  example database, no shrinking (minutes for a long stateful run), bounded so the
  convergence suite stays well under two minutes;
- `dev`: random, with the failure database kept between local runs, so a failure found once
  is replayed first next time;
- `long`: at least 100,000 state-machine steps (`max_examples * stateful_step_count`), with
  the database: `HYPOTHESIS_PROFILE=long pytest tests/testing/test_convergence.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILES = ("ci", "dev", "long")
LONG_STEPS = 100_000

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles(database_dir: str | os.PathLike[str] = ".hypothesis/examples") -> None:
    """Register the three profiles; `database_dir` holds the failures `dev`/`long` keep."""
    database = DirectoryBasedExampleDatabase(Path(database_dir))
    settings.register_profile(
        "ci",
        derandomize=True,
        database=None,
        # Shrinking a long stateful run can take minutes: CI reports the failure as found
        # (deterministic, replayable with the printed blob) and `dev` shrinks it locally.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        report_multiple_bugs=False,
        max_examples=100,
        stateful_step_count=40,
        deadline=None,
        print_blob=True,
        suppress_health_check=_QUIET,
    )
    settings.register_profile(
        "dev",
        database=database,
        max_examples=100,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=_QUIET,
    )
    settings.register_profile(
        "long",
        database=database,
        max_examples=4_000,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=_QUIET,
    )


def load_profile(default: str | None = None) -> str:
    """Load `HYPOTHESIS_PROFILE`, else `default`, else `ci` under CI and `dev` elsewhere."""
    name = os.environ.get("HYPOTHESIS_PROFILE") or default
    if name is None:
        name = "ci" if os.environ.get("CI") else "dev"
    settings.load_profile(name)
    return name
