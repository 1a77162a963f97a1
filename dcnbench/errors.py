"""Errors shared by the library and the CLI, and the type predicates their settings checks use."""

from __future__ import annotations


class InvalidSetting(ValueError):
    """A setting the library cannot honour; ``fields`` names the settings at fault (e.g. "max_size",
    "variant"), so that the CLI can name the matching options (``--max-size``, ``--variant``)."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def is_int(value: object) -> bool:
    """An int that is not a bool (a config value, e.g. from TOML or JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
