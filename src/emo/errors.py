"""Exceptions that carry a message meant for the user.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class EmoError(Exception):
    """Base class for errors caused by user input, files or the environment."""


class DataError(EmoError):
    """A dataset, manifest, split file or image is invalid."""


class CacheError(EmoError):
    """A feature cache is missing, foreign, incomplete or does not match the request."""


class WeightsError(EmoError):
    """Backbone weights cannot be found or do not fit the architecture."""


class RunError(EmoError):
    """A run directory is missing, incomplete or inconsistent."""


class TrainingError(EmoError):
    """Training cannot continue, e.g. because the loss became NaN or infinite."""
