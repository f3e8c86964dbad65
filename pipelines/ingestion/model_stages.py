"""The model stages of the ingest job: wav2vec2 features and VAE latents (Ray Data actor pools,
on GPUs when ``ingest.use_gpu``). Apart from :mod:`pipelines.ingestion.stages` because they load
torch and a model per actor; the CPU stages' workers stay light. Row kinds and columns: see
:mod:`pipelines.ingestion.stages`.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np

from pipelines.encoders.audio_features import AudioFeatureExtractor
from pipelines.encoders.latents import LatentCodec
from pipelines.ingestion.stages import (
    STAGE_TIMES_KEY,
    as_batch,
    chunk_row,
    error_text,
    first_value,
    reject_row,
)

# --- ingest stage 2: wav2vec2 features -----------------------------------------------------------------


class AudioFeatureStage:
    """Ray Data ``map_batches`` UDF (actor pool, ``batch_size=1``): wav2vec2 hidden states of
    every layer over the whole utterance, one vector per frame -> ``features`` f16 [N, L, D]."""

    def __init__(self, location: str, local_files_only: bool = True, device: str = "cpu", fps: float = 25.0):
        self.extractor = AudioFeatureExtractor(location, local_files_only=local_files_only, device=device)
        self.fps = fps

    def __call__(self, batch: dict) -> dict:
        row = {k: first_value(batch, k) for k in batch}
        samples = row.pop("samples")
        row["features"] = np.zeros((0, 1, 1), np.float16)
        if row["kind"] != "video":
            return as_batch(row)
        path = str(row["path"])
        try:
            t0 = time.perf_counter()
            feats = self.extractor(np.asarray(samples, np.float32), int(row["num_frames"]), fps=self.fps)
            row["features"] = np.asarray(feats, np.float16)
            info = json.loads(row["info"])
            info.setdefault(STAGE_TIMES_KEY, {})["audio_features"] = time.perf_counter() - t0
            row["info"] = json.dumps(info)
        except Exception as exc:  # noqa: BLE001
            bad = reject_row(row["video_id"], path, "features", error_text(path, exc),
                             json.loads(row["info"] or "{}"))
            bad.pop("samples")
            bad["features"] = row["features"]
            return as_batch(bad)
        return as_batch(row)


# --- ingest stage 4: VAE latents ---------------------------------------------------------------


def encode_jpegs(crops: np.ndarray, quality: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, S, S, 3] -> (concatenated JPEG bytes as uint8 [total], sizes int64 [n])."""
    from PIL import Image

    blobs = []
    for frame in crops:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
    sizes = np.array([len(b) for b in blobs], np.int64)
    return np.frombuffer(b"".join(blobs), np.uint8).copy(), sizes


class VaeStage:
    """Ray Data ``map_batches`` UDF (actor pool, ``batch_size=1`` chunk): crops -> ``latent`` f16
    [n, 4, S/8, S/8] (AutoencoderKL posterior mean x scaling factor). Crop pixels are dropped
    (kept only as JPEG bytes when ``write_jpeg``). Other row kinds pass through."""

    def __init__(self, location: str, local_files_only: bool = True, device: str = "cpu",
                 batch_size: int = 16, write_jpeg: bool = False):
        self.codec = LatentCodec(location, local_files_only=local_files_only, device=device)
        self.batch_size = batch_size
        self.write_jpeg = write_jpeg

    def __call__(self, batch: dict) -> dict:
        row = {k: first_value(batch, k) for k in batch}
        crops = np.asarray(row.pop("crops"))
        row["latent"] = np.zeros((0, 1, 1, 1), np.float16)
        row["jpeg"] = np.zeros((0,), np.uint8)
        row["jpeg_sizes"] = np.zeros((0,), np.int64)
        row["vae_s"] = 0.0  # seconds spent in the VAE for this chunk (benchmark)
        if row["kind"] != "chunk":
            return as_batch(row)
        try:
            t0 = time.perf_counter()
            row["latent"] = np.asarray(self.codec.encode(crops, batch_size=self.batch_size), np.float16)
            row["vae_s"] = time.perf_counter() - t0
            if self.write_jpeg:
                row["jpeg"], row["jpeg_sizes"] = encode_jpegs(crops)
        except Exception as exc:  # noqa: BLE001
            path = str(row["path"])
            bad = chunk_row(row, "reject", stage="vae", reason=f"vae: {error_text(path, exc)}")
            bad.pop("crops")
            bad.update(latent=row["latent"], jpeg=row["jpeg"], jpeg_sizes=row["jpeg_sizes"], vae_s=0.0)
            return as_batch(bad)
        return as_batch(row)
