"""Training room: the Ray Train loop, checkpoints and MLflow tracking. Entry point: train.py."""
