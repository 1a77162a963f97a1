"""CUDA kernels through cupy. Not written yet: reports itself unavailable."""

from __future__ import annotations


def status() -> tuple[bool, str]:
    return False, "CUDA kernels are not implemented yet"
