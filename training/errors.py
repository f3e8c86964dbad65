"""The training room's errors: a job that cannot start, a stage that had to stop, a bad checkpoint."""


class TrainingError(Exception):
    """A training job that cannot start (config, data, stage-1 model) or stopped (non-finite loss,
    no usable result), or a checkpoint that cannot be read."""


class StageResultError(TrainingError, RuntimeError):
    """Ray Train finished a stage without a usable result (no checkpoint, no final model in it)."""


class CheckpointError(TrainingError, FileNotFoundError):
    """A folder that is not a readable training checkpoint; the message names it."""


class TerminatedError(BaseException):
    """The job was told to stop (SIGTERM: ``train.py`` turns the signal into this exception).
    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` swallows it; the
    runs it ends are marked KILLED."""


class StageFailedError(TrainingError, RuntimeError):
    """Ray Train gave up on a stage (a worker failure beyond ``train.max_failures``, a worker
    group that could not start); the message has one line per failed rank."""


class InputStalledError(TrainingError, RuntimeError):
    """A worker waited longer than ``train.batch_timeout_s`` for its next batch: the input
    pipeline is starved (no CPU for the reader's tasks) or stuck. Raised in the worker, so Ray
    Train ends the worker group instead of waiting forever."""
