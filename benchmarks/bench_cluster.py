"""Compute per unit of work at the real (sd15) sizes, for the scale plan (cluster/README.md).

No GPU here and no real weights, so these are **FLOP counts, not timings**: the real-size networks
are built on PyTorch's ``meta`` device (shapes only, no memory, no weights) and one call is
counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention;
2 FLOPs per multiply-add). The scale plan turns them into A100 time with a stated utilisation
assumption.

Rows:
* VAE encode of one 512x512 frame (SD-1.5 ``AutoencoderKL`` config), ingest;
* wav2vec2-base over one second of 16 kHz audio, ingest (random weights, run on the CPU);
* Loopy stage 1 and stage 2 training samples (forward + backward; batch 1; stage 2 = 12 clip
  frames, reference + 20 motion latents, audio 5 x 12 x 768), built with
  ``LoopyModel.from_unet(sd15 U-Net config)`` - the model code of this repository, at SD-1.5 size;
* the stage-2 forward alone (gradient checkpointing recomputes about one forward);
* CPU seconds per frame of the ingest's CPU stages on a 1080p30 H.264 clip (4 s): the
  full-resolution decode + 25 fps resample + 800 px crop -> 512 (``iter_frames`` +
  ``crop_frames``), the detection-pass decode (``iter_frames(max_side=480)``) and dlib's face +
  68 landmarks with the 480 px downscale (``DlibDetector``). Measured as **process CPU time**
  (``time.process_time``, all threads), so other jobs on the machine do not inflate it the way
  they inflate wall-clock time.
"""
from __future__ import annotations

import builtins
import contextlib
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

NOTE = "FLOPs counted on the meta device (not timed; no GPU here)"


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def _meta_truth_values():
    """Model code that branches on a tensor (``bool(mask.all())``) cannot run on meta tensors
    (no values). For counting, such a check on a meta tensor answers True (no masking branch);
    every other ``bool`` call is the builtin. Restored on exit."""
    def meta_bool(value=False):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return True
        return builtins.bool(value)

    patched = [m for name, m in list(sys.modules.items()) if name.startswith("models.") and m is not None]
    for module in patched:
        module.bool = meta_bool
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("bool", None)


def vae_encode_tflops(size: int = 512) -> float:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=size,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512])
        frame = torch.empty(1, 3, size, size)
        return _flops(lambda: vae.encode(frame)) / 1e12


def wav2vec2_tflops_per_second(sample_rate: int = 16000) -> float:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    # small enough to run for real on the CPU (its feature encoder reads values, so no meta device)
    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config()).eval()  # base: 12 layers x 768, random weights
    audio = torch.randn(1, sample_rate)
    with torch.no_grad():
        return _flops(lambda: model(audio, output_hidden_states=True)) / 1e12


def loopy_train_tflops(stage: int) -> tuple[float, float, float]:
    """(forward + backward, forward) TFLOPs of one training sample, and parameters in millions."""
    from diffusers import UNet2DConditionModel

    import models.loopy  # noqa: F401  (loaded before the truth-value patch)
    from core.sections import ModelConfig
    from models.loopy import LoopyModel, sd15_unet_config

    cfg = ModelConfig(preset="sd15", audio_layers=12, audio_dim=768)
    f, m, h = (12, 20, 64) if stage == 2 else (1, 0, 64)
    with torch.device("meta"), _meta_truth_values():
        model = LoopyModel.from_unet(UNet2DConditionModel(**sd15_unet_config()), stage, cfg)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        batch = dict(noisy_latents=torch.empty(1, f, 4, h, h), timesteps=torch.tensor([500]),
                     ref_latent=torch.empty(1, 4, h, h))
        if stage == 2:
            no = torch.zeros(1, dtype=torch.bool)
            batch.update(motion_latents=torch.empty(1, m, 4, h, h), motion_mask=torch.ones(1, m, dtype=torch.bool),
                         audio=torch.empty(1, f, 5, cfg.audio_layers, cfg.audio_dim),
                         landmarks=torch.empty(1, f, 68, 2), head_motion_var=torch.empty(1),
                         expression_var=torch.empty(1), drop_audio=no, drop_motion_cond=no, drop_ref=no,
                         drop_motion_frames=no, a2l_kind=torch.zeros(1, dtype=torch.long))
        forward = _flops(lambda: model(**batch)) / 1e12
        total = _flops(lambda: model(**batch).sum().backward()) / 1e12
    return total, forward, params


def cpu_seconds_per_frame(seconds: float = 4.0) -> dict[str, float]:
    """Process CPU seconds per 25 fps output frame of the ingest's CPU stages on a 1080p30 clip."""
    import subprocess
    import tempfile
    from pathlib import Path

    import numpy as np

    from pipelines.faces.crop import crop_frames
    from pipelines.faces.detect import DlibDetector
    from pipelines.media.video_decode import iter_frames
    from pipelines.samples.talking_heads import TalkingHeadRenderer

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        clip = Path(tmp) / "clip_1080p30.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size=1920x1080:rate=30:duration={seconds}", "-vf", "noise=alls=12:allf=t",
                        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", str(clip)],
                       check=True)
        box = np.array([[560, 140, 1360, 940]], np.float32)  # an 800 px face box
        n, c0 = 0, time.process_time()
        for chunk in iter_frames(clip, fps=25.0, chunk_frames=50):
            n += len(crop_frames(chunk.frames, np.repeat(box, len(chunk), 0), 512))
        out["decode_full_1080p_crop512"] = (time.process_time() - c0) / n
        n, c0 = 0, time.process_time()
        for chunk in iter_frames(clip, fps=25.0, chunk_frames=50, max_side=480):
            n += len(chunk)
        out["decode_detect_pass_480"] = (time.process_time() - c0) / n
    renderer = TalkingHeadRenderer(1920, 1080, np.random.default_rng(0))
    frames = np.stack([renderer.render(t, 0.3) for t in np.linspace(0, 2, 6)])
    detector = DlibDetector(detect_max_side=480)
    detector.detect(frames[:1])
    c0 = time.process_time()
    _, found = detector.detect(frames)
    out["dlib_1080p_at_480"] = (time.process_time() - c0) / len(frames)
    if not found.all():
        raise RuntimeError("dlib missed the rendered face: the detection cost would be wrong")
    return out


def run() -> list[dict]:
    rows = []

    def row(metric, value, unit, note=NOTE):
        rows.append({"benchmark": "cluster", "metric": metric, "value": value, "unit": unit, "target": "",
                     "note": note})

    t0 = time.perf_counter()
    row("vae_encode_512px_per_frame", round(vae_encode_tflops(), 4), "TFLOP")
    row("wav2vec2_base_per_audio_second", round(wav2vec2_tflops_per_second(), 4), "TFLOP",
        "FLOPs counted on one CPU call with random weights (not timed)")
    for stage in (1, 2):
        total, forward, params = loopy_train_tflops(stage)
        row(f"loopy_stage{stage}_train_sample_fwd_bwd", round(total, 3), "TFLOP",
            f"{NOTE}; batch 1, {params:.0f} M parameters")
        row(f"loopy_stage{stage}_forward", round(forward, 3), "TFLOP")
    for name, secs in cpu_seconds_per_frame().items():
        row(f"cpu_s_per_frame_{name}", round(secs, 5), "CPU s/frame",
            "process CPU time (all threads) per 25 fps frame, 4 s 1080p30 H.264 clip")
    row("bench_wall", round(time.perf_counter() - t0, 1), "s", "whole module, wall clock")
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
