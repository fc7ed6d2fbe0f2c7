"""The trainer's errors. The first three are the user's to fix (lmkernels-train exits with 2 and
the message); TrainingStopped is a run that cannot go on (exit 1). Every message names the option,
file or wait concerned, what was expected and what was found."""


class ConfigError(ValueError):
    """A bad option; the message names it, what was expected and what was given."""


class DataError(ValueError):
    """Training data that cannot be used: empty, binary, or too short for block_size."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


class TrainingStopped(RuntimeError):
    """Training cannot go on: the loss became non-finite, or a distributed wait timed out."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)
