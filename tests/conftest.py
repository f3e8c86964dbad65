"""Shared fixtures. Ray runs embedded on 127.0.0.1 with its temp dir in the work tree."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_TMPDIR", str(ROOT / ".ray_tmp"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from core.ray_runtime import init_ray
    from core.sections import RayConfig

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A synthetic ingest output (4 videos x 60 frames, 3 train + 1 test) for the training tests,
    one per test module (a module may define its own ``data_dir`` instead)."""
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest

    out = tmp_path_factory.mktemp("ingest")
    write_synthetic_ingest(out, num_frames=(60, 60, 60, 60), latent_shape=(4, 8, 8), audio_shape=(2, 32),
                           splits=["train", "train", "train", "test"], content="random")
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny pretrained folders written with save_pretrained (shared by the session)."""
    from core.sections import WeightsConfig
    from core.weights import resolve_weights

    root = tmp_path_factory.mktemp("tiny_weights")
    cfg = WeightsConfig(preset="tiny", tiny_dir=str(root))
    return cfg, resolve_weights(cfg)


@pytest.fixture(scope="session")
def tiny_package(tiny_weights, tmp_path_factory):
    """An untrained stage-2 Loopy model package (loopy/, platform.yaml, vae/, wav2vec2/) built on
    the tiny weights: the layout training writes (models.untrained_package)."""
    from models.untrained_package import write_untrained_package

    weights_cfg, _ = tiny_weights
    folder = tmp_path_factory.mktemp("tiny_package") / "package"
    return write_untrained_package(folder, overrides=[f"weights.tiny_dir={weights_cfg.tiny_dir}"])


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``). Tiny models run as fast on one
    thread, and on a 2-core machine shared with other jobs OpenMP's spinning threads make them
    about 10x slower; results do not depend on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Modules that take longest, longest first, from a serial run's --durations (seconds: test_train 365,
# test_object_storage ~395 on a loaded machine (three ingests, two training stages, an evaluation), test_multinode 266,
# test_ingest_limits 127, test_serve_faults 94, test_ingest 92, test_train_faults 91,
# test_evaluate 86, test_ingest_real_world 62, test_person_tracks ~60 (73 s at load 10), test_video_metrics 60,
# test_sampler 52, test_serve 45;
# test_serve_drain ~115 and test_serve_hardening ~70 estimated from runs on a loaded machine).
# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder: each worker takes the
# next module when it is nearly done, so handing the long ones out first keeps the two workers
# finishing together (a long module dealt last would run alone at the end). Any other module
# follows in collection order; within a module the order is unchanged.
LONGEST_MODULES = (
    "test_train", "test_object_storage", "test_multinode", "test_ingest_limits", "test_serve_drain", "test_serve_faults",
    "test_ingest", "test_train_faults", "test_evaluate", "test_serve_hardening", "test_reference_path",
    "test_ingest_real_world", "test_person_tracks", "test_closeups", "test_identities", "test_train_cluster", "test_video_metrics",
    "test_sampler", "test_serve",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: module order kept otherwise
    config.loopy_module_order = list(dict.fromkeys(item.path.stem for item in items))
