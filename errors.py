"""Errors the pack raises on purpose. Each message says what is wrong and how to fix it."""


class BlockCacheError(Exception):
    """Base class for every error a user of the pack can act on."""


class ScheduleFormatError(BlockCacheError, ValueError):
    """A schedule or profile document is malformed, truncated or of another version."""


class ScheduleMismatchError(BlockCacheError, ValueError):
    """A schedule does not fit the model it is applied to."""


class UnsupportedModelError(BlockCacheError, TypeError):
    """No cacheable layers were found in a model."""


class ScheduleFileError(BlockCacheError, OSError):
    """A schedule file name is unsafe, or the file cannot be read or written."""


class ScheduleBuildError(BlockCacheError, ValueError):
    """A schedule cannot be built from this profile with these options."""
