"""Data the project makes itself, so every part runs with no downloads: the demo's talking-head
videos, synthetic ingest outputs for tests, and multi-person scenes for the detector checks."""
