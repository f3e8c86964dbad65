"""The ingest job: raw videos -> ``videos.parquet`` + ``frames/<video_id>.parquet`` on Ray Data.
Its command line is ``pipelines/ingest.py``; :func:`pipelines.ingestion.job.run_ingest` is the job."""
