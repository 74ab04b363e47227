"""Registers and loads the hypothesis profiles (`ci`, `dev`, `long`) for the whole suite.

Imported by tests/conftest.py; `HYPOTHESIS_PROFILE` picks one (default: `ci` when the `CI`
variable is set, `dev` otherwise). The failure database lives in .hypothesis/ (gitignored).
"""

from pathlib import Path

from crdtchat.testing.profiles import load_profile, register_profiles

register_profiles(Path(__file__).resolve().parent.parent / ".hypothesis" / "examples")
PROFILE = load_profile()
