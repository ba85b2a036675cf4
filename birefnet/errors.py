"""Exception types shared by light entry points (no heavy imports here, so catching them costs nothing)."""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message names the file, what is wrong and what is expected."""
