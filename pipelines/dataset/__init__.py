"""The dataset format shared by the ingest (writer) and the training reader: the manifest
``videos.parquet``, the per-video frame files and ``ingest_meta.json`` (docs/CONTRACTS.md)."""
