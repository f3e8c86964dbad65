"""Reading media files: probe (streams, timestamps, rotation, limits), frames resampled by
timestamp, audio as 16 kHz mono float32."""
