"""Data room: ingest (raw videos -> Parquet, on Ray Data) and the training-time reader."""
