"""Errors shared by the library and the CLI."""

from __future__ import annotations


class InvalidSetting(ValueError):
    """A setting the library cannot honour; ``fields`` names the settings at fault (e.g. "max_size",
    "variant"), so that the CLI can name the matching options (``--max-size``, ``--variant``)."""

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields
