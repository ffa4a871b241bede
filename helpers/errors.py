"""The exceptions the course raises for input a user can fix.

Every message is one line that says what is wrong and what to do. The command line
prints it and exits non-zero without a traceback (`--verbose` shows the traceback).
"""


class CourseError(Exception):
    """Base class: a problem with the user's data, settings or files, not a bug."""


class DatasetError(CourseError):
    """The dataset is missing, partial, corrupt or cannot be downloaded."""


class ConfigError(CourseError, ValueError):
    """A setting is out of range: batch size, epochs, learning rate, probabilities..."""


class CheckpointError(CourseError):
    """A checkpoint is missing, truncated, of another architecture, or cannot be written."""


class NewerCheckpointError(CheckpointError):
    """A checkpoint written by a newer version of the course code: update the code, never overwrite it."""


class OutputError(CourseError):
    """A folder or file for the run's outputs (figures, records, the checkpoints' folder) cannot be written."""


class DivergenceError(CourseError, FloatingPointError):
    """The loss became NaN or infinite during training."""


class ImageError(CourseError):
    """A file given to `predict` is not a readable image."""


def require_positive(name: str, value, hint: str = "") -> None:
    """Raise ConfigError unless `value` is a number > 0 (used for batch sizes, epochs, LRs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}{hint}")


def require_probability(name: str, value) -> None:
    """Raise ConfigError unless 0 <= value <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability between 0 and 1, got {value!r}")


def require_whole(name: str, value, minimum: int = 1) -> None:
    """Raise ConfigError unless `value` is a whole number >= minimum (epochs, batch sizes, steps)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
