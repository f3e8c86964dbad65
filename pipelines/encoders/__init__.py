"""The learned encoders of the data: wav2vec2 features per 25 fps frame and VAE latents of the
face crops (torch; the ingest runs them in their own actor pools)."""
