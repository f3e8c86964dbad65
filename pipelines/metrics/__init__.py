"""Scores of a generated or real video (face found, landmarks, lip sync against the audio,
PSNR / SSIM, head and expression motion), shared by evaluation, the demo and benchmarks."""
