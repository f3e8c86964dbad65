"""The training room's error: a job that cannot start or a stage that had to stop."""


class TrainingError(Exception):
    """A training job that cannot start (config, data, stage-1 model) or stopped (non-finite loss)."""
