"""Every config section of the platform, in one place, and the :class:`PlatformConfig` that holds them.

One section per concern: ``ray``, ``weights``, ``tracking`` (every job), ``ingest`` and ``reader``
(data), ``model`` and ``sampler`` (networks and inference), ``train`` and ``serve``. Loading,
overrides and validation live in :mod:`core.config`; this module only declares the fields, their
types, defaults and units. Relative paths in any section are resolved against the project root by
:func:`core.paths.project_path`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# --- shared by every job ------------------------------------------------------------------------

@dataclass
class RayConfig:
    """Where jobs run. ``address: local`` starts an embedded Ray on 127.0.0.1 (laptop, tests);
    ``auto`` or ``ray://host:10001`` joins a cluster. Under ``ray job submit`` the RAY_ADDRESS
    environment variable wins, so the same command line runs on a cluster unchanged."""

    address: str = "local"
    num_cpus: Optional[int] = 2  # embedded Ray only
    num_gpus: Optional[int] = None  # embedded Ray only; None lets Ray detect
    object_store_memory_mb: Optional[int] = 1024  # embedded Ray only
    include_dashboard: bool = False


@dataclass
class WeightsConfig:
    """Pretrained weights. ``tiny``: random tiny models materialised with ``save_pretrained`` under
    ``tiny_dir`` and loaded back with ``from_pretrained`` (no download, tests and demo).
    ``sd15``: real weights from local directories or hub ids (never fetched by tests)."""

    preset: Literal["tiny", "sd15"] = "tiny"
    tiny_dir: str = "work/tiny_weights"  # relative paths are under the project root
    sd15: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder: unet/, vae/
    vae: Optional[str] = None  # e.g. stabilityai/sd-vae-ft-mse; None = <sd15>/vae (tiny: the random tiny VAE)
    wav2vec2: str = "facebook/wav2vec2-base-960h"
    dwpose_dir: Optional[str] = None  # folder with yolox_l.onnx + dw-ll_ucoco_384.onnx; None = dlib
    local_files_only: bool = True  # never reach a hub unless the user turns this off


@dataclass
class TrackingConfig:
    """MLflow. Default: a sqlite file in the project folder, artifacts beside it."""

    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are under the project root
    artifact_root: str = "mlruns"
    experiment: str = "loopy"
    registered_model: str = "loopy"
    # training workers log asynchronously (training.tracking.AsyncRunLogger): an outage of the
    # tracking server delays or drops metrics, never fails training
    async_queue_size: int = 1000  # calls waiting to be written; more are dropped with a warning
    retry_for_s: float = 600.0  # a failed write is retried (backoff) this long, then dropped
    flush_timeout_s: float = 30.0  # a worker waits this long for its queue at the end of a stage
    http_max_retries: int = 2  # MLflow REST client's own retries per call in workers
    http_timeout_s: float = 10.0  # MLflow REST client's timeout per request in workers, seconds


# --- data: ingest job and training reader ------------------------------------------------------

@dataclass
class IngestConfig:
    """Raw videos -> per-frame Parquet. Units: frames at ``fps``, pixels, seconds, Hz."""

    fps: float = 25.0  # output frame rate; resampling is by timestamp
    crop_size: int = 64  # output portrait side in pixels (512 for sd15)
    crop_margin: float = 0.6  # extra context around the landmark box, as a fraction of its side
    # where the asked crop (crop_margin) does not fit the frame but the head does (close-ups;
    # docs/INGEST.md "Close-ups"), one rule per video and for the portrait: "reduce" = one smaller
    # margin for the whole video, every pixel real (default: a filled border would be learnt and
    # drawn); "reflect" / "blur" / "constant" (black) = the asked crop with the border filled
    crop_fill: Literal["reduce", "reflect", "blur", "constant"] = "reduce"
    sample_rate: int = 16000  # audio, Hz, mono
    chunk_frames: int = 50  # frames decoded and processed per block: bounds peak memory
    min_frames: int = 136  # 12 clip + 124 motion frames: shorter videos are rejected
    write_jpeg: bool = False  # also store the JPEG of each crop
    # dlib = HOG; mtcnn = torch MTCNN, on a GPU when use_gpu (docs/INGEST.md "Detector choice")
    detector: Literal["dlib", "dlib_cnn", "mtcnn", "dwpose"] = "dlib"
    detect_max_side: int = 480  # make_detector's detect(): frames downscaled to this longest side (metrics, VAE fit)
    # ingest detection scale (pipelines/faces/detect.py search_face_scale / pass_scale): a search on
    # a few sampled frames finds the face size, the whole pass shows it at detect_face_px
    detect_face_px: float = 100.0  # face box width in the detection image (px)
    detect_max_pixels: int = 3_200_000  # detection image budget (px): 5 % faces of 720p-1080p reach ~64 px
    detect_max_upscale: float = 2.0  # largest detection image / display frame ratio
    scale_search_frames: int = 5  # sampled frames of the scale search, spread over the whole video
    # face tracks (pipelines/faces/tracks.py): subject = most persistent x largest track
    track_max_gap_s: float = 0.5  # a face unseen this long still continues its track
    min_track_coverage: float = 0.5  # share of frames a track needs to count as a person
    similar_face_ratio: float = 0.7  # the portrait: a 2nd face this large (x the largest) is refused
    # which persistent tracks are people and who speaks (pipelines/faces/person_tracks.py, speaker.py;
    # docs/INGEST.md "Persistent distractors and the person who speaks")
    # scale search: faces down to this x the largest persistent one are found (shown >= 1.25 detector windows)
    person_face_ratio: float = 0.5
    min_face_confidence: float = 0.3  # median detector score re-scored at a fixed face size (dlib HOG)
    max_face_shape_error: float = 0.25  # median Procrustes residual of the 68 points to a mean face
    min_mouth_motion: float = 0.015  # spread (p90 - p10) of inner-lip gap / face width: a face that talks
    min_speaker_sync: float = 0.3  # 2+ people: the speaker's mouth-audio correlation (the evaluation's sync)
    speaker_sync_margin: float = 0.2  # ... and its lead over the next person
    # quality filters (reasons are recorded in the manifest)
    max_missing_face_ratio: float = 0.2
    max_yaw_deg: float = 60.0
    max_head_motion: float = 0.5  # std of the face centre over the video, in face widths
    max_audio_video_offset_s: float = 0.5
    test_fraction: float = 0.1  # deterministic split by hash of video_id
    num_decode_workers: Optional[int] = None  # decode + crop actor pool size; None = num_detect_actors
    model_batch_size: int = 16  # frames per VAE call
    use_gpu: bool = False  # put the VAE / wav2vec2 actors (and the analysis actors with detector mtcnn) on GPUs
    # ingest job (pipelines/ingest.py): splits, resume, Ray Data stage sizes
    split_key: Literal["video", "folder"] = "video"  # folder: one person's folder never spans both splits
    # share of the frames with a face whose head leaves the frame (landmark box + 0.1 of its side
    # of forehead above, 0.05 below the chin: pipelines/faces/crop.py); a crop margin that does not
    # fit is never counted (crop_fill)
    max_out_of_frame_ratio: float = 0.1
    retry_rejected: bool = False  # resume: also redo videos rejected by an earlier run
    num_detect_actors: int = 1  # actor pool: probe + face detection + crop track + audio decode
    num_audio_actors: int = 1  # actor pool: wav2vec2 features
    num_vae_actors: int = 1  # actor pool: VAE latents
    stage_num_cpus: float = 0.25  # logical CPUs reserved per task/actor of each stage
    model_num_gpus: float = 1.0  # GPUs per wav2vec2 / VAE actor when use_gpu
    max_task_retries: int = 1  # a video whose worker dies this often more is recorded as rejected
    # work units and shots (docs/INGEST.md "Shots and time ranges"): a source longer than
    # 1.5 x unit_s is split into ranges of about unit_s seconds, each its own Ray task through the
    # whole pipeline; inside a range, cuts (pipelines/media/cuts.py) split it into shots and each
    # usable shot is its own sample
    unit_s: float = 300.0
    cut_threshold: float = 20.0  # mean |difference| of 24 x 24 thumbnails (grey levels) for a cut
    cut_ratio: float = 3.0  # x (1 + local median difference): the adaptive part of the threshold
    dissolve_frames: int = 12  # longest dissolve found (frames); 0: hard cuts only
    max_chunk_mb: int = 128  # full-resolution pass: fewer than chunk_frames frames per chunk for big sources
    # decoders (pipelines.media.video_decode backends): decord's full-resolution get_batch grew to ~4.5 GB
    # on a 1-minute 1080p file (PyAV: flat ~1 GB), so the full-resolution pass uses PyAV
    detect_decode_backend: Literal["auto", "decord", "pyav"] = "auto"  # low-res detection pass
    decode_backend: Literal["auto", "decord", "pyav"] = "pyav"  # full-resolution crop pass
    # limits checked from the probe before any decoding (pipelines/ingestion/quality.py check_limits)
    # a guard against absurd timestamps, not a cap on real sources: long sources are split into
    # time ranges (unit_s) that run on any worker; the decoding work a file asks for (source
    # frames x coded pixels, from the probe) is capped by max_decode_gpixels
    max_duration_s: float = 86400.0  # longer videos are refused (stage "limits")
    max_decode_gpixels: float = 2000.0  # ~3 h of 1080p60 or 2 h of 4K30 (stage "limits")
    max_pixels: int = 3840 * 2160  # coded width x height from the stream header
    min_source_frames_ratio: float = 0.3  # distinct source frames / output frames (below: frozen/sparse)
    # per-video deadline of the analysis (probe, detection pass, audio) and, separately, of the
    # full-resolution decode + crop, each in a watched child process: base + per_s x duration, in
    # seconds the child works (time it waits for a CPU on a loaded node is not charged:
    # pipelines/ingestion/watchdog.py WorkBudget); past it the child is killed and the video
    # rejected (stage "timeout")
    deadline_base_s: float = 120.0
    deadline_per_s: float = 4.0  # seconds of work allowed per second of video
    # fault injection (tests / drills only): the analysis of a file whose name contains
    # ``fault_hang_match`` hangs (a hung decoder); the actor analysing ``fault_kill_match`` is killed;
    # the full-resolution decode of ``fault_decode_hang_match`` hangs after its first chunk
    fault_hang_match: Optional[str] = None
    fault_kill_match: Optional[str] = None
    fault_decode_hang_match: Optional[str] = None


@dataclass
class ReaderConfig:
    """Ingested Parquet -> Loopy training samples. Units: frames at 25 fps."""

    clip_frames: int = 12
    motion_frames: int = 124
    segment_stride: int = 4  # s: abstract frames per segment
    segment_ratio: int = 2  # r: segment k spans s * r**k frames
    abstraction: Literal["uniform", "mean"] = "uniform"
    audio_window: int = 2  # frames each side: t-2..t+2
    ref_min_distance: int = 12  # frames between the reference and the clip
    samples_per_video: int = 8  # per epoch
    early_start_prob: float = 0.2  # share of clip starts drawn with < motion_frames of history
    p_drop_audio: float = 0.10
    p_drop_motion_cond: float = 0.0  # extra motion-latents-only drop; p_drop_audio's coin drops both
    p_drop_ref: float = 0.15
    p_drop_motion_frames: float = 0.40
    seed: int = 0
    stage: int = 2  # 1: one target frame + reference, no motion frames or audio
    split: str = "train"
    # Appearance augmentation (ours, not the paper's; docs/METHOD.md): one random change of colour
    # and geometry per training sample, the same for its reference, clip and motion frames, so a
    # model that memorises a look instead of reading the reference pays for it in the loss.
    appearance_aug: bool = True  # the tiny preset (the embedded default); configs/sd15.yaml turns it off
    aug_prob: float = 0.8  # share of training samples changed
    aug_hue_deg: float = 180.0  # hue rotation drawn from [-x, x] degrees (about the grey axis)
    aug_saturation: float = 0.4  # saturation scale drawn from [1 - x, 1 + x]
    aug_brightness: float = 0.25  # brightness offset drawn from [-x, x] (RGB in -1..1)
    aug_contrast: float = 0.25  # contrast scale drawn from [1 - x, 1 + x]
    aug_flip_prob: float = 0.5  # horizontal flip (latents and landmarks)
    # where the change is made (pipelines/reader/appearance.py): "latent" through the dataset's linear
    # latent <-> RGB map (free; for VAEs near-linear in colour, like SD's), "pixel" by decoding and
    # re-encoding with the dataset's VAE (exact; one VAE round trip per frame), "auto" by the map's fit
    appearance_space: Literal["auto", "latent", "pixel"] = "auto"


# --- networks and inference -------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The Loopy networks. ``preset`` picks the U-Net size (tiny for CPU, sd15 for real)."""

    preset: Literal["tiny", "sd15"] = "tiny"
    audio_layers: int = 2  # wav2vec2 hidden layers kept (12 for base)
    audio_dim: int = 32  # wav2vec2 hidden size (768 for base)
    motion_latent_tokens: int = 8  # size of the audio-to-latents embedding bank
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The reference latent also enters the denoising U-Net's input beside the noisy latents (conv_in
    # widened, its new weights zero: at the start it computes what the paper's model computes).
    # Our addition, not the paper's (docs/METHOD.md): a position-aligned path for the reference's
    # appearance, for U-Nets whose attention alone does not learn to copy it (the tiny preset).
    reference_concat: bool = False


@dataclass
class SamplerConfig:
    """DDIM sampling with Loopy's three-way guidance. The same dataclass carries one request's
    options: the service and the CLI start from the configured section and replace the fields a
    client sets (``dataclasses.replace``), so defaults are declared once, here."""

    steps: int = 25  # DDIM steps
    audio_ratio: float = 5.0  # e_final = audio_ratio * (e_audio - e_ref) + ...
    ref_ratio: float = 3.0  # ... + ref_ratio * (e_ref - e_base) + e_base
    # (ours; 0 = the paper's sampler) the guided prediction's standard deviation pulled back
    # towards that of the fully conditioned one, this share (Lin et al. 2023, "Common diffusion
    # noise schedules and sample steps are flawed", 3.4): high guidance on a weak model blows the
    # latents up; docs/METHOD.md 9
    guidance_rescale: float = 0.0
    # (ours; 0 = the paper's sampler) each clip starts from its reference latent noised to this
    # share of the schedule (the DDIM steps above it are skipped) instead of from pure noise
    reference_init: float = 0.0
    # (ours; 1 = the paper's sampler) the starting noise is scaled by this ("temperature"): DDIM
    # adds no noise after the start, so below 1 every latent component the model cannot predict
    # ends nearer its conditional mean instead of a random draw of its spread; docs/METHOD.md 9
    noise_scale: float = 1.0
    seed: int = 0  # initial noise of every clip is drawn from one generator seeded with this
    fps: float = 25.0  # output frame rate; audio features are computed for this rate
    size: Optional[int] = None  # output side in pixels; None = the model's crop size
    max_audio_s: Optional[float] = 60.0  # longer audio is refused by the sampler (None: no limit)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        for name in ("guidance_rescale", "reference_init", "noise_scale"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"sampler.{name} must be between 0 and 1, got {value!r}")


# --- training ------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Ray Train DDP training of both stages (``train.*``). Steps are optimizer steps per stage."""

    # --- Ray Train scaling (ScalingConfig; docs/TRAINING.md) ---
    num_workers: int = 2  # DDP workers (processes); CPU + gloo unless use_gpu
    use_gpu: bool = False  # one NCCL worker per GPU
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu: a whole number (NCCL: one rank per GPU)
    cpus_per_worker: float = 0.5  # logical CPUs per worker; leaves CPUs for the reader tasks beside it
    # where the workers go (ScalingConfig.placement_strategy): "pack" (PACK: as few nodes as
    # possible), "spread" (SPREAD: one per node while nodes last), "strict-spread" (STRICT_SPREAD:
    # one per node, or the job is refused); "auto": spread for CPU workers and on GPU nodes of
    # one GPU each, pack on nodes of several GPUs (NVLink inside a node)
    placement: Literal["auto", "pack", "spread", "strict-spread"] = "auto"
    # worker-group start attempts Ray Train makes when the placement group is not ready within its
    # start timeout (60 s each; FailureConfig.controller_failure_limit); -1 = wait forever
    # (a cluster whose autoscaler adds nodes)
    placement_retries: int = 5
    reader_cpus: float = 0.5  # logical CPUs per Ray Data read task of data_loader "ray_data"
    # seconds a worker waits for its next batch; longer: the stage ends with an error naming this
    # key (a starved or stuck input pipeline never hangs the job); counted as a worker failure
    batch_timeout_s: float = 600.0
    # --- data ---
    # "ray_data": the reader's Ray Dataset streamed into each worker (get_dataset_shard);
    # "torch": the reader's torch Dataset sharded by rank (bit-exact resume: every rank always
    # sees the same batches, Ray Data's streaming split assigns blocks to workers dynamically).
    data_loader: Literal["ray_data", "torch"] = "ray_data"
    batch_size: int = 2  # clips per worker per step
    # --- optimisation ---
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10  # linear warm-up, then constant (diffusers "constant_with_warmup")
    max_grad_norm: float = 1.0  # gradient clipping; <= 0 disables
    max_steps: int = 20  # per stage
    # stage 1's own step count (None: max_steps). A stage-1 step (one frame per clip, no motion
    # frames or audio) costs ~1/4 of a stage-2 step on the tiny preset, and stage 1 is where the
    # reference path (the appearance) is learned.
    stage1_max_steps: Optional[int] = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast on GPU only
    ema_decay: Optional[float] = None  # e.g. 0.9999; None = no EMA
    find_unused_parameters: bool = False  # DDP; only if the model leaves parameters unused
    seed: int = 0
    # --- noise schedule (diffusers DDPMScheduler, SD-1.5 settings) ---
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # what the denoiser predicts: "epsilon" (the noise: SD-1.5's and the paper's, for fine-tuning
    # SD) or "v_prediction" (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho 2022; ours for a U-Net
    # trained from scratch, the demo's: an eps error at the noisiest steps reaches the clean-latent
    # estimate multiplied by sqrt((1 - a) / a), 14.7 at t = 999, and a briefly trained tiny model's
    # DDIM samples blew up to 3x the latents' std; a v error reaches it 1:1). The package records
    # it, so the sampler's DDIM uses the same (docs/METHOD.md 8)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # how the diffusion MSE weighs the latent channels: "uniform" (every channel alike: SD's, the
    # paper's) or "pixel" (ours, for a linear codec: each channel by the pixel energy one latent
    # unit of it decodes to, so the loss is the MSE of the decoded patches; a whitened PatchCodec's
    # first channels, a patch's mean colour, decode 10-30x larger than its detail channels, and a
    # uniform loss spends most of a short run on the details; docs/METHOD.md 8)
    latent_loss_weight: Literal["uniform", "pixel"] = "uniform"
    # stage 2 only (ours, not the paper's; 0 = off = the paper's loss): the squared error of the
    # latent cells over the mouth counts 1 + mouth_loss_weight times (the box of the clip frame's
    # lip landmarks 48-67, grown by mouth_loss_margin of its size on each side, as the share of
    # each latent cell it covers). The mouth is a few % of a face crop and the only region the
    # audio predicts; a uniform MSE spends a short run on the rest (docs/METHOD.md 8)
    mouth_loss_weight: float = 0.0
    mouth_loss_margin: float = 0.5
    # --- checkpoints, logging, evaluation ---
    checkpoint_every: int = 10  # steps; the last step always checkpoints
    checkpoints_to_keep: int = 2
    log_every: int = 1  # steps between metric logs to MLflow (asynchronous; Ray Train reports only with checkpoints)
    # checkpoints are staged in a local temp dir and uploaded by Ray Train to storage_path; "async"
    # uploads in a background thread (training goes on), but a worker failure right after the
    # report can lose that checkpoint (seen in the fault test: the restart began at step 0)
    checkpoint_upload: Literal["async", "sync"] = "sync"
    block_rows: int = 16  # samples per Ray Data block of the training dataset (independent of batch_size)
    eval_every: int = 10  # steps; the last step always evaluates; 0 = only at the end
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 500, 900])
    eval_max_batches: int = 4  # test-split batches per evaluation
    eval_sample_steps: int = 4  # DDIM steps of the sample video at evaluation (0 = no video)
    eval_num_cpus: float = 0.5  # the checkpoint evaluation task (Ray Train validation), beside the workers
    eval_num_gpus: float = 1.0  # GPUs of the evaluation task when use_gpu
    eval_videos: int = 0  # > 0: also the evaluation job's metrics on this many test videos (evaluate_package)
    max_failures: int = 1  # Ray Train FailureConfig: worker failures recovered from the last checkpoint
    storage_path: str = "work/ray_results"  # relative paths are under the project root
    # --- fault injection (tests / drills only), once per stage (only stage ``fault_stage`` when
    # set): before step ``fault_at_step`` rank ``fault_rank`` exits ("exit": a killed worker), gets
    # a NaN batch ("nan": the NaN guard) or loses its MLflow server for ``fault_steps`` steps
    # ("mlflow_outage": a dead 127.0.0.1 port) ---
    fault_at_step: Optional[int] = None
    fault_stage: Optional[int] = None  # 1 or 2: only in that stage; None: in each stage of the job
    fault_rank: int = 1
    fault_kind: Literal["exit", "nan", "mlflow_outage", "stall"] = "exit"  # "stall": its input blocks forever
    fault_steps: int = 1

    def __post_init__(self):
        for name in ("mouth_loss_weight", "mouth_loss_margin"):
            value = getattr(self, name)
            if not float(value) >= 0.0:
                raise ValueError(f"train.{name} must be >= 0, got {value!r}")


# --- evaluation ---------------------------------------------------------------------------------

@dataclass
class EvaluationConfig:
    """The evaluation job (``evaluate.py``, ``evaluation.*``; docs/EVALUATION.md): every video of a
    split generated from one reference frame and its own audio, scored against the real frames.
    Units: frames at 25 fps, seconds, pixels. Thresholds are on the mean over the split's videos;
    ``None`` turns a threshold off. The alias moves only when every set threshold passes."""

    split: str = "test"
    max_videos: Optional[int] = None  # first N videos of the split (manifest order); None = all
    max_seconds: Optional[float] = None  # audio (and frames) evaluated per video; None = the whole video
    reference_frame: int = 0  # frame of each video whose stored latent is the reference
    steps: Optional[int] = None  # DDIM steps; None = the package's sampler.steps
    device: str = "auto"  # auto | cpu | cuda (inside each actor)
    # landmarks of the metrics (dwpose: weights.dwpose_dir; mtcnn runs on the CPU here)
    detector: Literal["dlib", "dlib_cnn", "mtcnn", "dwpose"] = "dlib"
    min_detect_side: int = 256  # frames are upscaled to at least this side before landmark detection
    max_lag: int = 2  # frames: sync's lag search is -max_lag..max_lag
    # seconds of the moving mean sync removes from the mouth opening and the loudness first (only
    # the frame-to-frame following counts; None = off, the correlation of the raw series)
    sync_detrend_s: Optional[float] = 1.0
    # the codec frames (stored latents decoded by the package's VAE) scored too: codec_face_found_ratio,
    # codec_psnr, codec_ssim, codec_sync, codec_identity, the ceiling the VAE puts on every figure
    codec_metrics: bool = True
    # --- Ray Data actors (one sampler each) ---
    num_actors: int = 1
    use_gpu: bool = False
    gpus_per_actor: float = 1.0  # when use_gpu
    cpus_per_actor: float = 1.0
    # --- outputs ---
    output_dir: str = "work/evaluation"  # JSON and side-by-side videos; relative paths under the project root
    side_by_side_videos: int = 1  # real | generated mp4s (with audio) logged to MLflow
    # --- optional learned metrics: only from weights given by path, never downloaded ---
    # SyncNet (LSE-D / LSE-C per video): TorchScript net(lip [B, 3, 5, 224, 224] BGR 0..255,
    # mfcc [B, 1, 13, 20]) -> (lip_emb [B, D], audio_emb [B, D]); None = skipped
    syncnet_path: Optional[str] = None
    # FID / FVD (inference/learned_metrics.py, docs/EVALUATION.md): TorchScript files; None = skipped.
    # FID: frames float32 [N, 3, S, S] in [0, 1] -> features [N, D] (e.g. Inception-v3 pool3, 2048-d,
    # S = 299), pooled over every frame of the split
    fid_weights_path: Optional[str] = None
    fid_input_size: int = 299  # S of the FID network: frames are resized (bilinear) to S x S
    # FVD: clips float32 [N, 3, T, S, S] in [-1, 1] -> features [N, D] (e.g. i3d_torchscript.pt, 400-d)
    fvd_weights_path: Optional[str] = None
    fvd_input_size: int = 224  # S of the FVD network
    fvd_clip_frames: int = 16  # T: non-overlapping clips of each video (a shorter tail is dropped)
    # i3d: net(x, rescale=False, resize=False, return_features=True) (the I3D TorchScript); plain: net(x)
    fvd_call_convention: Literal["i3d", "plain"] = "i3d"
    # csim (pipelines/metrics/identity.py): ArcFace TorchScript net(faces [N, 3, 112, 112] RGB in -1..1,
    # aligned to the five-point template) -> embeddings [N, D]; None = skipped. The dlib descriptor
    # metrics (identity, identity_gt, identity_control) need no weights and always run.
    arcface_path: Optional[str] = None
    identity_frames: int = 25  # frames per video (spread over it) described for the identity metrics
    feature_batch_size: int = 32  # frames per FID call (FVD: this // fvd_clip_frames clips; SyncNet: // 5)
    # --- registry alias ---
    alias: Optional[str] = "champion"  # None: never move an alias
    min_sync: Optional[float] = 0.30
    min_sync_margin: Optional[float] = 0.15  # sync - sync_control
    min_face_found_ratio: Optional[float] = 0.90
    min_psnr: Optional[float] = None  # dB
    max_lmd: Optional[float] = None  # fraction of face width
    max_identity: Optional[float] = 0.6  # dlib descriptor distance, generated frames to their reference
    min_identity_margin: Optional[float] = 0.10  # identity_control - identity


# --- serving -------------------------------------------------------------------------------------

@dataclass
class ServeConfig:
    """The Ray Serve HTTP service (``serve.*``). Sizes in MB, durations in seconds.

    No secret lives here: this section is dumped to MLflow params, to every model package's
    ``platform.yaml`` and to the Serve app args. Client tokens come from the environment
    (``LOOPY_SERVE_TOKENS_FILE``: a file of ``client_id token`` lines; ``LOOPY_SERVE_TOKENS``:
    ``client_id:token,...``) or from the file named by ``tokens_file``; the job database URL of a
    server with a password comes from ``LOOPY_SERVE_JOB_DB`` (see docs/SERVICE.md)."""

    host: str = "127.0.0.1"  # any other address refuses to start without client tokens
    port: int = 8000
    model: Optional[str] = None  # MLflow model URI (models:/loopy/1, models:/loopy@stage2) or a local path
    num_replicas: int = 1
    gpus_per_replica: float = 0.0
    max_queue: int = 8  # jobs queued or running at once; more answer 429
    max_queue_per_client: int = 4  # one client's share of max_queue (with client tokens); more answer 429
    max_upload_mb: int = 20  # per uploaded file
    max_audio_s: float = 30.0
    job_dir: str = "work/serve_jobs"
    cpus_per_replica: float = 1.0  # CPUs reserved by each sampler worker replica
    job_ttl_s: float = 3600.0  # finished jobs (and their files) are removed after this many seconds
    # --- auth and browsers ---
    tokens_file: Optional[str] = None  # path of a `client_id token` file (the env variables win)
    allowed_origins: list[str] = field(default_factory=list)  # browser origins besides the page's own
    # Host header values accepted besides the loopback names (127.0.0.1, localhost, [::1], any
    # port): the service's public names, "name" (any port) or "name:port"; others answer 421
    allowed_hosts: list[str] = field(default_factory=list)
    docs: bool = False  # serve /docs and /openapi.json
    # --- request limits (ingress and HTTP proxy) ---
    max_ongoing_requests: int = 32  # requests one ingress replica handles at once
    max_queued_requests: int = 64  # requests waiting for the ingress; beyond it the proxy answers 503
    request_timeout_s: float = 120.0  # Serve HTTP proxy: one request, end to end
    body_timeout_s: float = 60.0  # reading one upload body (slow clients get 408)
    # --- the front listener (serve/front.py) on host:port, before Serve's proxy reads a byte ---
    max_header_bytes: int = 16384  # request line + headers, bytes; more answer 431
    max_headers: int = 64  # header fields per request; more answer 431
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this (408)
    proxy_port: Optional[int] = None  # Serve's HTTP proxy, on 127.0.0.1 behind the front; None: a free port
    max_frame_steps: int = 20000  # frames x DDIM steps one job may ask for (750 frames x 25 steps = 18750)
    max_image_megapixels: float = 16.0  # JPEG / PNG / WebP header size checked before decoding
    max_audio_channels: int = 2
    max_audio_rate_hz: int = 96000
    min_audio_rate_hz: int = 8000  # audio sampled below this answers 422
    # --- deadlines ---
    job_timeout_s: float = 900.0  # a running job fails after this and frees its worker
    hang_grace_s: float = 30.0  # the worker's health check fails this long after a job's deadline
    drain_grace_s: float = 60.0  # on SIGINT/SIGTERM running jobs may finish this long; then interrupted
    # --- job store ---
    job_db: Optional[str] = None  # SQLAlchemy URL without password; None = sqlite file in job_dir
    sweep_every_s: float = 30.0  # expired jobs and orphan folders are removed on this timer
    max_disk_mb: int = 4096  # bytes under job_dir (inputs + videos); beyond it new jobs answer 503
    max_attempts: int = 2  # a job interrupted by a restart or a lost worker is run at most this often
    # --- model ---
    model_poll_s: float = 30.0  # workers re-resolve a models:/name@alias URI this often (0: never)
    # --- fault injection (tests / drills only): a job with this seed blocks its worker thread
    # (not cooperatively cancellable) after its first clip, as a sampler stuck in native code ---
    fault_hang_seed: Optional[int] = None


# --- the platform config --------------------------------------------------------------------------

@dataclass
class PlatformConfig:
    """Everything a job reads. Defaults = embedded laptop setting with the ``tiny`` preset."""

    ray: RayConfig = field(default_factory=RayConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
