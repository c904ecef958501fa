"""Every error `distill` raises on purpose, in one tree, so callers can catch by audience.

::

    MMKDDistillError
    ├── UnknownNameError          a model/loss/dataset name that no registry knows
    ├── CommandError              a CLI subcommand that is missing or cannot start
    └── DatasetError              a dataset folder is unusable; messages name the file and line
        ├── DatasetFormatError    bad JSON/CSV, missing columns, unknown layout, bad dataset.json
        ├── MissingImageError     a metadata row points at an image file that does not exist
        ├── UnreadableImageError  the image file exists but cannot be decoded
        ├── LabelError            a row has no label where one is required, or a label outside the label list
        └── EmptySplitError       a split folder or its metadata has no rows

Other parts of `distill` append their own (ConfigError, CheckpointError, TeacherLoadError) below.
"""

from __future__ import annotations


class MMKDDistillError(Exception):
    """Root of every error raised on purpose by `distill`."""


class UnknownNameError(MMKDDistillError, KeyError):
    """A registry lookup failed; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CommandError(MMKDDistillError):
    """A `mmkd-distill` subcommand is not available or was called wrongly."""


class DatasetError(MMKDDistillError):
    """A dataset folder cannot be used. `path` and `line` (1-based, 0 if not line-specific) locate the problem."""

    def __init__(self, message: str, *, path: object = None, line: int = 0) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class DatasetFormatError(DatasetError):
    """Metadata that does not parse (bad JSON or CSV, missing columns) or a malformed dataset.json."""


class MissingImageError(DatasetError):
    """A metadata row names an image file that does not exist."""


class UnreadableImageError(DatasetError):
    """An image file exists but is not a decodable PNG/JPEG/WebP."""


class LabelError(DatasetError):
    """A label is missing where labels are required, or is not in the dataset's label list."""


class EmptySplitError(DatasetError):
    """A split has no metadata file or no rows."""


class ConfigError(MMKDDistillError):
    """A config file or ``--set`` override is unknown, of the wrong type, or out of range."""


class CheckpointError(MMKDDistillError):
    """A run folder or checkpoint is missing, unreadable, or does not fit the model."""


class TeacherLoadError(MMKDDistillError):
    """A ``--teacher`` folder cannot be loaded (unknown kind, missing files, mismatched labels)."""
