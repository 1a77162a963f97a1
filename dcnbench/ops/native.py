"""Native C++ CPU kernels (built on first use). Not written yet: reports itself unavailable."""

from __future__ import annotations


def status() -> tuple[bool, str]:
    return False, "native CPU kernels are not implemented yet"
