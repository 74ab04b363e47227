"""Resident memory of a process, for the tests that bound it (issue 12)."""

from __future__ import annotations


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size from /proc (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/<pid>/status")
