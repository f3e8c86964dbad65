"""Evaluation during training (rank 0): validation loss at fixed timesteps on the test split, the
loss plot, and a short sample video of the current model.

* Validation loss: for every test batch and every timestep in ``train.eval_timesteps`` the
  clip latents are noised with noise drawn from a generator seeded by (seed, batch index), so
  every evaluation of a run scores the same noisy inputs: the numbers are comparable across
  steps. The test split is read with the condition switches all off (``LoopySampleSource``
  with a non-train split). Metrics: ``val_loss`` (mean) and ``val_loss_t<T>`` per timestep.
* Audio use (stage 2, :func:`audio_use`): the prediction's error over the mouth with each clip's
  own audio against another clip's, at the same fixed timesteps and noise: ``val_audio_gain``.
* Sample video (stage 2): the first test clip's reference latent and audio, generated with
  :class:`inference.sampler.LoopySampler` (``train.eval_sample_steps`` DDIM steps) from a package
  of the current weights, decoded by the package's VAE, written as mp4 (no audio track: the
  ingest output stores features, not waveforms).
* Glo / Exp (docs/METHOD.md, evaluation): variance of the nose tip and of the upper-face points over
  the generated clip (landmarks from the ingest's detector) vs. the ground-truth clip's. A tiny
  random model generates no detectable face: then ``face_found_share`` is 0 and the generated
  statistics are NaN (not logged).
* The evaluation job's metrics (:func:`evaluate_package`, docs/EVALUATION.md): whole test videos
  generated from a reference frame and their own audio, scored by
  :func:`pipelines.metrics.video_metrics.score_video` (psnr, ssim, lmd, sync, sync_control, glo, exp, ...);
  the same per-video function (:func:`evaluate_row`) runs in the job's Ray Data actors. FID / FVD
  (``evaluation.fid_weights_path`` / ``fvd_weights_path``, :mod:`inference.learned_metrics`): each
  video's generated and real features come back with its record and the distances are computed
  over the whole split at the end (:func:`learned_metric_results`). LSE-D / LSE-C
  (``evaluation.syncnet_path``) are per video (``lse_d``, ``lse_c`` and ``_gt`` for the real
  frames), averaged into ``mean``.
* Identity (:mod:`pipelines.metrics.identity`): per video ``identity`` / ``identity_gt`` (dlib
  descriptor distance of the generated / real frames to the reference frame) and ``csim`` (with
  ``evaluation.arcface_path``); over the split ``identity_control`` (distance to the other
  videos' references), ``identity_margin`` (control - identity) and ``identity_nearest`` (share
  of videos whose own reference is the nearest) (:func:`add_split_identity`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from core.sections import EvaluationConfig
from inference.errors import InferenceError
from inference.evaluate_video import evaluate_video, read_eval_video, split_videos
from inference.learned_metrics import (
    FeatureNetworks,
    learned_metric_values,
    load_feature_networks,
    lse_means,
)
from inference.sampler import LoopySampler
from pipelines.errors import PipelineError
from pipelines.faces.detect import make_detector
from pipelines.faces.motion_stats import clip_motion_stats, motion_stats_ratio
from pipelines.metrics.identity import ArcFaceEmbedder, FaceDescriber, VideoIdentity, split_identity, video_identity
from pipelines.reader.source import LoopySampleSource, collate
from training.step import diffusion_loss, mouth_region_weights, prediction_and_target, to_device

log = logging.getLogger(__name__)


def load_test_batches(data_dir: str | Path, reader_cfg, batch_size: int, max_batches: int
                      ) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_batches`` batches of the test split (epoch 0, switches off); [] without test videos."""
    source = LoopySampleSource(data_dir, reader_cfg, split="test")
    specs = source.epoch_specs(0)[: batch_size * max_batches]
    return [collate([source.load(s) for s in specs[i:i + batch_size]]) for i in range(0, len(specs), batch_size)]


def eval_noise_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of test batch ``batch_index``'s noise: the same at every evaluation of a run."""
    return torch.Generator().manual_seed(seed * 7919 + batch_index)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], noise_scheduler,
                    timesteps: Sequence[int], seed: int, device: torch.device,
                    mixed_precision: str = "no", channel_weights: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Mean training loss (the same target and channel weights, :func:`training.step.diffusion_loss`)
    over ``batches`` at each fixed timestep -> ``{"val_loss", "val_loss_t<T>"}``."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    try:
        per_t: dict[int, list[float]] = {int(t): [] for t in timesteps}
        for i, batch in enumerate(batches):
            batch = to_device(batch, device)
            b = batch["latents"].shape[0]
            for t in per_t:
                gen = eval_noise_generator(seed, i)
                ts = torch.full((b,), t, dtype=torch.long)
                per_t[t].append(float(diffusion_loss(model, batch, noise_scheduler, gen, ts, mixed_precision,
                                                            channel_weights)))
    finally:
        model.train(was_training)
    out = {f"val_loss_t{t}": float(np.mean(v)) for t, v in per_t.items()}
    out["val_loss"] = float(np.mean(list(out.values())))
    return out


@torch.no_grad()
def audio_use(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], noise_scheduler,
              timesteps: Sequence[int], seed: int, device: torch.device, mixed_precision: str = "no",
              mouth_margin: float = 0.5) -> dict[str, float]:
    """Does the denoiser use the audio? The squared error of its prediction over the mouth (the
    cells of :func:`training.step.mouth_region_weights`, each weighed by the share the mouth box
    covers) with each clip's own audio, and with the audio of the next clip of the batch (the same
    noisy input, the same noise), at each fixed timestep. Keys: ``val_mouth_loss``,
    ``val_mouth_loss_other_audio`` and ``val_audio_gain`` = 1 - own / other (0: the audio is
    ignored; > 0: the right audio predicts the mouth better). Stage-2 batches of two or more clips
    only (audio and landmarks); {} otherwise. Independent of the sampler and of any face detector,
    so it shows the audio path learning long before a generated mouth moves."""
    usable = [(i, b) for i, b in enumerate(batches)
              if "audio" in b and "landmarks" in b and b["latents"].shape[0] >= 2]
    if not usable:
        return {}
    was_training = model.training
    model.eval()
    own, other = [], []
    try:
        for i, batch in usable:  # i: the batch's index, so its noise is validation_loss's
            batch = to_device(batch, device)
            swapped = dict(batch, audio=torch.roll(batch["audio"], 1, 0))
            latents = batch["latents"]
            cover = mouth_region_weights(batch["landmarks"], latents.shape[-2], latents.shape[-1], 1.0,
                                         mouth_margin) - 1.0  # [B, F, 1, h, w]
            norm = float(cover.sum()) * latents.shape[2]
            if norm <= 0:
                continue
            for t in timesteps:
                ts = torch.full((latents.shape[0],), int(t), dtype=torch.long)
                for target_list, b in ((own, batch), (other, swapped)):
                    gen = eval_noise_generator(seed, i)  # the same noise for both
                    pred, target = prediction_and_target(model, b, noise_scheduler, gen, ts, mixed_precision)
                    target_list.append(float(((pred - target) ** 2 * cover).sum()) / norm)
    finally:
        model.train(was_training)
    if not own:
        return {}
    mouth, mouth_other = float(np.mean(own)), float(np.mean(other))
    return {"val_mouth_loss": mouth, "val_mouth_loss_other_audio": mouth_other,
            "val_audio_gain": 1.0 - mouth / mouth_other if mouth_other > 0 else float("nan")}


def plot_losses(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One line per metric (``{name: [(step, value), ...]}``) -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def generate_sample(package_dir: str | Path, batch: dict[str, torch.Tensor], steps: int, seed: int = 0
                    ) -> Optional[np.ndarray]:
    """Frames uint8 [F, S, S, 3] of the first clip of ``batch`` (its reference latent and its
    clip's audio features) generated by :class:`inference.sampler.LoopySampler` from
    ``package_dir`` with ``steps`` DDIM steps. None when the batch has no audio (stage 1: the
    sampler needs a stage-2 model)."""
    if "audio" not in batch:
        return None

    sampler = LoopySampler.from_package(str(package_dir), device="cpu")
    window = batch["audio"].shape[2]
    features = batch["audio"][0, :, window // 2].float().numpy()  # [F, L, D]: each frame's own features
    options = dataclasses.replace(sampler.default_options, steps=int(steps), seed=int(seed))
    latents = sampler.generate_latents(batch["ref_latent"][:1].float(), features, options)
    return np.concatenate(list(sampler.decode_frames(latents)), axis=0)


def motion_statistics(frames: np.ndarray, gt_landmarks: np.ndarray, detector) -> dict[str, float]:
    """The paper's Glo / Exp of generated ``frames`` (uint8 [F, S, S, 3]; landmarks found by the
    ingest's ``detector``, divided by S = crop-normalised like the ingest) and of the ground-truth
    clip's landmarks [F, 68, 2]. Keys: ``glo_gen``, ``exp_gen``, ``glo_gt``, ``exp_gt``,
    ``glo_ratio``, ``exp_ratio`` (generated / ground truth) and ``face_found_share`` (generated
    frames with a detected face; the statistics need 2 or more, else they are NaN)."""
    pixels, found = detector.detect(frames)
    size = float(frames.shape[1])
    gen = clip_motion_stats(np.where(found[:, None, None], pixels / size, 0.0).astype(np.float32), valid=found)
    gt = clip_motion_stats(np.asarray(gt_landmarks, dtype=np.float32))
    return {"glo_gen": gen.glo, "exp_gen": gen.exp, "glo_gt": gt.glo, "exp_gt": gt.exp,
            **motion_stats_ratio(gen, gt), "face_found_share": float(found.mean()) if found.size else 0.0}


# --- the evaluation job's metrics ------------------------------------------------------------------

#: Key of a record's per-video FID / FVD features (``{name: float32 [N, D]}``); popped by
#: :func:`learned_metric_results`, never written to the JSON.
FEATURES_KEY = "learned_features"

#: Metrics averaged into ``mean`` (per-video keys of score_video plus ``sync_margin``).
MEAN_KEYS = ("psnr", "ssim", "lmd", "sync", "sync_control", "sync_margin", "glo", "exp", "glo_gt", "exp_gt",
             "sync_gt", "sync_control_gt", "face_found_ratio", "face_found_ratio_gt", "frames",
             "generate_s", "score_s", "identity", "identity_gt", "identity_control", "identity_margin",
             "identity_nearest", "identity_found_ratio", "csim", "codec_face_found_ratio", "codec_psnr",
             "codec_ssim", "codec_sync", "codec_identity")
IDENTITY_KEY = "identity_descriptors"  # per-video descriptors for the split-level figures, popped before the JSON


@dataclass
class IdentityScorer:
    """The identity metrics' networks, built once per process: dlib's descriptor always, ArcFace
    when ``evaluation.arcface_path`` is given."""

    describer: FaceDescriber
    arcface: Optional[ArcFaceEmbedder]
    frames: int

    @classmethod
    def build(cls, eval_cfg: EvaluationConfig, device: Any = "cpu") -> "IdentityScorer":
        arc = ArcFaceEmbedder(eval_cfg.arcface_path, str(device)) if eval_cfg.arcface_path else None
        return cls(FaceDescriber(eval_cfg.min_detect_side), arc, eval_cfg.identity_frames)

    def score(self, generated: np.ndarray, real: Optional[np.ndarray], reference: np.ndarray) -> dict[str, Any]:
        """``identity``, ``identity_gt``, ``identity_found_ratio``, ``csim`` (with ArcFace) and the
        descriptors under :data:`IDENTITY_KEY`."""
        v = video_identity(self.describer, generated, real, reference, self.frames)
        out: dict[str, Any] = dict(v.metrics)
        if self.arcface is not None:
            out["csim"] = self.arcface.csim(generated, reference, self.frames)
        out[IDENTITY_KEY] = {"generated": v.generated.tolist(), "reference": v.reference.tolist()}
        return out

    def describe_distance(self, frames: np.ndarray, reference: np.ndarray) -> float:
        """Mean dlib descriptor distance of ``frames`` uint8 [T, S, S, 3] (the same frame subset
        as ``identity``) to ``reference`` [S, S, 3]; NaN when no face is found in either."""
        return float(video_identity(self.describer, frames, None, reference, self.frames).metrics["identity"])


def _float_rows(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """[k, 128] float64 from lists of floats with None for NaN."""
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows], np.float64).reshape(-1, 128)


def add_split_identity(records: Sequence[dict]) -> None:
    """Pop :data:`IDENTITY_KEY` from the ``ok`` records and add each one's ``identity_control``,
    ``identity_margin`` and ``identity_nearest`` against the split's other videos."""
    have = [r for r in records if IDENTITY_KEY in r]
    videos = []
    for r in have:
        d = r.pop(IDENTITY_KEY)  # lists of floats; None where JSON carried a NaN (the Ray path)
        own = float("nan") if r.get("identity") is None else float(r["identity"])
        videos.append(VideoIdentity({"identity": own}, _float_rows(d["generated"]), _float_rows([d["reference"]])[0]))
    for r, extra in zip(have, split_identity(videos)):
        r.update(extra)


def metric_detector(eval_cfg: EvaluationConfig, dwpose_dir: Optional[str] = None):
    """The landmark detector of the metrics (``evaluation.detector``; dlib by default)."""
    return make_detector(eval_cfg.detector, dwpose_dir if eval_cfg.detector == "dwpose" else None)


def evaluate_row(sampler: LoopySampler, detector, data_dir: str | Path, row: dict, eval_cfg: EvaluationConfig,
                 steps: Optional[int] = None, keep_frames: bool = False,
                 networks: Optional[FeatureNetworks] = None, identity: Optional[IdentityScorer] = None
                 ) -> dict[str, Any]:
    """Generate and score one manifest row (``video_id``, ``source``) of an ingest output.

    Returns ``{"video_id", "status": "ok", "real_from", "notes", **metrics}`` (plus
    ``"evaluation"``: the :class:`inference.evaluate_video.VideoEvaluation` with the frames and
    ``"samples"`` when ``keep_frames``; ``FEATURES_KEY``: the FID / FVD features of the
    generated and real frames when ``networks`` has any) or, for a video that cannot be evaluated (an input error:
    bad file, too short, features that do not fit the model), ``{"video_id", "status":
    "rejected", "reason"}``; other exceptions (infrastructure) propagate so they are retried."""
    vid = str(row["video_id"])
    try:
        video = read_eval_video(data_dir, vid, eval_cfg.reference_frame, eval_cfg.max_seconds,
                                source=row.get("source"))
        result = evaluate_video(sampler, video, detector, steps if steps is not None else eval_cfg.steps,
                                max_lag=eval_cfg.max_lag, min_detect_side=eval_cfg.min_detect_side,
                                detrend_s=eval_cfg.sync_detrend_s,
                                codec=eval_cfg.codec_metrics)
    except (InferenceError, PipelineError) as exc:
        log.warning("evaluation of %s rejected: %s", vid, exc)
        return {"video_id": vid, "status": "rejected", "reason": f"{type(exc).__name__}: {exc}"}
    metrics = dict(result.metrics)
    metrics["sync_margin"] = metrics["sync"] - metrics["sync_control"]
    out: dict[str, Any] = {"video_id": vid, "status": "ok", "real_from": result.real_from,
                           "notes": list(result.notes), **metrics}
    if networks is not None and networks.any:  # outside the try: a failure here is not the video's fault
        out[FEATURES_KEY] = networks.video_features(result.generated, result.real)
    if networks is not None and networks.syncnet is not None:
        lse, note = networks.syncnet.scores(result.generated, result.real, video.samples, video.sample_rate, video.fps)
        out.update(lse)
        if note:
            out["notes"].append(note)
    if identity is not None:  # outside the try, as above
        ref = result.real[min(eval_cfg.reference_frame, len(result.real) - 1)]
        out.update(identity.score(result.generated, result.real, ref))
        if result.codec is not None:  # the VAE's own ceiling (inference.evaluate_video)
            out["codec_identity"] = identity.describe_distance(result.codec, ref)
    if keep_frames:
        out["evaluation"] = result
        out["samples"] = video.samples
        out["sample_rate"] = video.sample_rate
        out["fps"] = video.fps
    return out


def mean_metrics(videos: Sequence[dict]) -> dict[str, float]:
    """Mean over the ``ok`` videos of each metric in :data:`MEAN_KEYS`, NaN values left out (a
    metric NaN for every video stays NaN); ``videos``: how many were averaged."""
    ok = [v for v in videos if v.get("status") == "ok"]
    out: dict[str, float] = {"videos": float(len(ok))}
    for key in MEAN_KEYS:
        values = [float(v[key]) for v in ok if key in v and v[key] is not None and math.isfinite(float(v[key]))]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def skipped_metrics(eval_cfg: EvaluationConfig, notes: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The learned metrics with no value, each with its reason: those whose weights are not given
    (they are only ever read from a path, never downloaded) and those ``notes`` (from
    :func:`learned_metric_results`) says are NaN."""
    out = {}
    for names, key, what in ((("lse_c", "lse_d"), "syncnet_path", "SyncNet"),
                             (("fid",), "fid_weights_path", "FID network (e.g. Inception-v3 pool3 TorchScript)"),
                             (("fvd",), "fvd_weights_path", "FVD network (e.g. the I3D TorchScript)"),
                             (("csim",), "arcface_path", "ArcFace network (TorchScript, aligned 112 px faces)")):
        for name in names:
            if not getattr(eval_cfg, key):
                out[name] = f"no {what} given (evaluation.{key}); weights are never downloaded"
            elif notes and name in notes:
                out[name] = notes[name]
    return out


def learned_metric_results(eval_cfg: EvaluationConfig, records: Sequence[dict]
                           ) -> tuple[dict[str, float], dict[str, str]]:
    """FID / FVD over the ``ok`` records (their :data:`FEATURES_KEY` features pooled over the
    videos; the key is popped from every record) -> ``(values for mean, skipped)``: ``values``
    has ``fid`` / ``fvd`` and ``fid_frames`` / ``fvd_clips`` for the configured networks (NaN
    with its reason in ``skipped`` when there are too few frames / clips) and, with a SyncNet,
    the means of the per-video ``lse_d``, ``lse_c``, ``lse_d_gt``, ``lse_c_gt``."""
    features = [r.pop(FEATURES_KEY) for r in records if FEATURES_KEY in r]
    values, notes = learned_metric_values(features, eval_cfg)
    lse_values, lse_notes = lse_means(records, eval_cfg)
    return {**values, **lse_values}, skipped_metrics(eval_cfg, {**notes, **lse_notes})


def evaluate_package(package_dir: str | Path, data_dir: str | Path, split: str = "test",
                     max_videos: Optional[int] = None, steps: Optional[int] = None, device: str = "auto",
                     evaluation: Optional[EvaluationConfig] = None) -> dict[str, Any]:
    """The evaluation job's metrics in this process (no Ray): every ``ok`` video of ``split`` of
    the ingest output ``data_dir`` (the first ``max_videos``; None = ``evaluation.max_videos``)
    generated by the package ``package_dir`` (folder or MLflow URI) with ``steps`` DDIM steps
    (None: ``evaluation.steps``, else the package's ``sampler.steps``) and scored.

    ``evaluation``: the settings (default: the package's ``evaluation`` section). Returns
    ``{"videos": [per-video dicts of evaluate_row], "mean": {...}, "rejected": [...],
    "skipped": {metric: reason}, "split": split}``; metrics NaN where undefined. With
    ``evaluation.fid_weights_path`` / ``fvd_weights_path`` set, ``mean`` also has ``fid`` /
    ``fvd`` (over the whole split) and ``fid_frames`` / ``fvd_clips``; a broken weights file raises
    :class:`inference.learned_metrics.LearnedMetricError` before any video is generated."""
    sampler = LoopySampler.from_package(str(package_dir), device=device)
    eval_cfg = evaluation or sampler.cfg.evaluation
    networks = load_feature_networks(eval_cfg, sampler.device)  # a broken weights path fails here
    rows = split_videos(data_dir, split)
    limit = max_videos if max_videos is not None else eval_cfg.max_videos
    if limit is not None:
        rows = rows[: int(limit)]
    detector = metric_detector(eval_cfg, sampler.cfg.weights.dwpose_dir)
    identity = IdentityScorer.build(eval_cfg, sampler.device)
    results = [evaluate_row(sampler, detector, data_dir, row, eval_cfg, steps, networks=networks, identity=identity)
               for row in rows]
    ok = [r for r in results if r["status"] == "ok"]
    learned, skipped = learned_metric_results(eval_cfg, ok)
    add_split_identity(ok)
    return {"split": split, "videos": ok, "mean": {**mean_metrics(ok), **learned},
            "rejected": [r for r in results if r["status"] != "ok"], "skipped": skipped}
