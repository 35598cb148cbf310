"""User errors that any layer may raise; the entry points turn them into one sentence and exit 1.

Kept in a module of its own so tasks and data code can raise them without importing the
Hydra-facing ``mnv3.cli``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work (e.g. a head with a dataset of the wrong kind)."""


class StorageError(OSError):
    """A file the run must write could not be written (disk full, quota, file size limit,
    read-only disk): one sentence that says what was kept, instead of torch's
    ``[enforce fail at inline_container.cc] unexpected pos`` traceback."""
