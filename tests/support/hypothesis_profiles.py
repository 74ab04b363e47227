"""Registers and loads the hypothesis profiles (`ci`, `dev`, `long`) for the whole suite.

Imported by tests/conftest.py; `HYPOTHESIS_PROFILE` picks one (default: `ci` when the `CI`
variable is set, `dev` otherwise). The failure database lives in .hypothesis/ (gitignored).
"""

from crdtchat.testing.profiles import load_profile, register_profiles
from tests.support import REPO

register_profiles(REPO / ".hypothesis" / "examples")
PROFILE = load_profile()
