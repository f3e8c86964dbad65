"""Identity metrics (pipelines/metrics/identity.py): dlib's face descriptor distance of a video to
its reference, the split-level control and nearest-reference figures, and ArcFace's csim."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.metrics.identity import (
    ArcFaceEmbedder,
    FaceDescriber,
    IdentityMetricError,
    VideoIdentity,
    split_identity,
    video_identity,
)
from pipelines.samples.identities import source_photo


def face_crop(name: str, size: int = 96, shift: float = 0.0) -> np.ndarray:
    """A square crop around the face of a source photo (uint8 [size, size, 3]); ``shift`` moves
    it by that share of the face size (a head that moves)."""
    from PIL import Image

    ph = source_photo(name)
    (cx, cy), s = ph.face_centre, ph.face_size
    cx += shift * s
    box = (int(cx - 1.1 * s), int(cy - 1.1 * s), int(cx + 1.1 * s), int(cy + 1.1 * s))
    return np.asarray(Image.fromarray(ph.image).crop(box).resize((size, size)))


@pytest.fixture(scope="module")
def describer():
    return FaceDescriber()


def test_same_person_is_near_another_person_is_far(describer):
    ref_a, ref_b = face_crop("astronaut"), face_crop("hopper")
    video_a = np.stack([face_crop("astronaut", shift=s) for s in (-0.05, 0.0, 0.05)])
    same = video_identity(describer, video_a, video_a, ref_a)
    other = video_identity(describer, video_a, None, ref_b)
    assert same.metrics["identity"] < 0.3 and same.metrics["identity_gt"] < 0.3
    assert other.metrics["identity"] > 0.6  # dlib's same-person threshold
    assert same.metrics["identity_found_ratio"] == 1.0 and "identity_gt" not in other.metrics
    blank = video_identity(describer, np.full((2, 96, 96, 3), 128, np.uint8), None, ref_a)
    assert math.isnan(blank.metrics["identity"]) and blank.metrics["identity_found_ratio"] == 0.0


def test_split_identity_control_and_nearest():
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((3, 128)) * 0.1
    # videos 0 and 1 look like their own references; video 2 looks like video 0's reference
    gens = [refs[0] + 0.01, refs[1] - 0.01, refs[0] + 0.02]
    videos = [VideoIdentity({"identity": float(np.linalg.norm(g - r))}, np.stack([g, g]), r) for g, r in zip(gens, refs)]
    out = split_identity(videos)
    assert [o["identity_nearest"] for o in out] == [1.0, 1.0, 0.0]
    want = np.mean([np.linalg.norm(gens[0] - refs[1]), np.linalg.norm(gens[0] - refs[2])])
    assert out[0]["identity_control"] == pytest.approx(want)
    assert out[2]["identity_margin"] < 0 < out[0]["identity_margin"]
    alone = split_identity(videos[:1])
    assert math.isnan(alone[0]["identity_control"]) and math.isnan(alone[0]["identity_nearest"])


class MeanColourNet(torch.nn.Module):
    """A stand-in embedding network: mean colour of three horizontal bands (9-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, :, i * 37:(i + 1) * 37].mean(dim=(2, 3)) + 1.5 for i in range(3)], 1).flatten(1)


def test_arcface_csim_runs_a_torchscript_network_on_aligned_faces(tmp_path):
    path = tmp_path / "arcface.pt"
    torch.jit.script(MeanColourNet()).save(str(path))
    arc = ArcFaceEmbedder(path)
    faces, found = arc.aligned(np.stack([face_crop("astronaut"), np.full((96, 96, 3), 128, np.uint8)]))
    assert faces.shape == (1, 112, 112, 3) and found.tolist() == [True, False]
    ref = face_crop("astronaut")
    assert arc.csim(np.stack([ref, ref]), ref) == pytest.approx(1.0, abs=1e-5)
    assert arc.csim(np.stack([face_crop("hopper")]), ref) < 1.0
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(IdentityMetricError, match="broken.pt"):
        ArcFaceEmbedder(tmp_path / "broken.pt")
    with pytest.raises(IdentityMetricError, match="no such file"):
        ArcFaceEmbedder(tmp_path / "missing.pt")


def test_split_figures_from_records_as_the_ray_job_carries_them():
    """The evaluation job's records carry descriptors as JSON lists (None for NaN): the split-level
    figures are added to each record and the descriptors removed."""
    import json

    from training.evaluation import IDENTITY_KEY, add_split_identity, mean_metrics

    refs = np.eye(3, 128)  # three references 1.41 apart
    records = []
    for k in range(3):
        gen = np.stack([refs[k] * 0.9, np.full(128, np.nan)])  # one frame without a face
        records.append(json.loads(json.dumps({
            "video_id": f"v{k}", "status": "ok", "identity": 0.1,
            IDENTITY_KEY: {"generated": [[None if np.isnan(x) else x for x in row] for row in gen.tolist()],
                           "reference": refs[k].tolist()}})))
    add_split_identity(records)
    assert all(IDENTITY_KEY not in r for r in records)
    assert all(r["identity_nearest"] == 1.0 for r in records)
    want = np.linalg.norm(refs[0] * 0.9 - refs[1])
    assert records[0]["identity_control"] == pytest.approx(want)
    mean = mean_metrics(records)
    assert mean["identity_nearest"] == 1.0 and mean["identity_margin"] == pytest.approx(want - 0.1)
