"""Data room (layer 2): raw videos in, training samples out. Read the folders in data-flow order:

* ``media/``      any audio or video file: probe (``probe.py``), frames by timestamp
                  (``video_decode.py``), 16 kHz mono audio (``audio_decode.py``);
* ``faces/``      find, follow and crop the speaker: detectors and the scale search
                  (``detect.py``), tracks across frames (``tracks.py``), the 68-point layout
                  (``landmarks.py``), which tracks are people (``person_tracks.py``) and which of
                  them speaks (``speaker.py``, on ``mouth_sync.py``: the mouth-audio sync the
                  evaluation shares), face-centred square crops (``crop.py``), head and expression
                  statistics (``motion_stats.py``);
* ``encoders/``   learned features: wav2vec2 per 25 fps frame (``audio_features.py``), VAE latents
                  (``latents.py``);
* ``ingestion/``  the ingest job built from the above: the Ray Data graph (``job.py``), its CPU and
                  model stages (``stages.py``, ``model_stages.py``), the per-video deadline
                  (``watchdog.py``), quality rules (``quality.py``), frame files
                  (``frame_writer.py``), output metadata (``meta.py``) and resume (``resume.py``);
* ``dataset/``    the on-disk format between ingest and training: inputs, ids, splits and the
                  manifest (``manifest.py``), frame files and ``ingest_meta.json`` (``schema.py``),
                  where the input hours go (``losses.py``);
* ``reader/``     the training-time reader: samples from a dataset (``source.py``), what each
                  sample draws (``sample_spec.py``); ``python -m pipelines.reader DIR --show N``;
* ``samples/``    data the project makes itself: the demo's talking-head videos
                  (``talking_heads.py``, ``python -m pipelines.samples``), synthetic ingest outputs
                  for tests (``synthetic_ingest.py``), multi-person detection scenes
                  (``face_scenes.py``);
* ``metrics/``    scores of a video against its audio and reference (``video_metrics.py``), used by
                  evaluation and the demo.

``ingest.py`` is the ingest command (``python pipelines/ingest.py``, an entry point nobody imports);
``errors.py`` the room's base error. Within the room, dependencies run from ``ingestion`` /
``reader`` / ``samples`` / ``metrics`` down to ``media`` / ``faces`` / ``encoders`` / ``dataset``.
"""
