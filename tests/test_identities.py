"""The sample data's people (pipelines/samples/identities.py): distinct to a face network, built
deterministically, and kept apart by split (no training video shows a test person)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.metrics.identity import FaceDescriber
from pipelines.samples.identities import IDENTITIES, build_identity, identity_photo, region_masks, source_photo
from pipelines.samples.talking_heads import SAMPLE_SPECS, SPLIT_FOLDERS, generate_samples

pytestmark = pytest.mark.slow  # 15 photos built (~3 s each) and described


@pytest.fixture(scope="module")
def descriptors():
    describer = FaceDescriber()
    out = {}
    for spec in IDENTITIES:
        d, found = describer.describe(identity_photo(spec.name).image[None])
        assert found[0], spec.name
        out[spec.name] = d[0]
    return out


def test_enough_people_and_a_test_split_of_their_own():
    train = [s.name for s in IDENTITIES if s.split == "train"]
    test = [s.name for s in IDENTITIES if s.split == "test"]
    assert len(train) >= 12 and len(test) >= 3 and len(set(train + test)) == len(IDENTITIES)
    assert {s.identity for s in SAMPLE_SPECS} == {s.name for s in IDENTITIES}  # one video per person
    assert all(s.split == "test" for s in SAMPLE_SPECS if s.identity in test)


def test_people_differ_to_a_face_network(descriptors):
    names = list(descriptors)
    d = np.array([[np.linalg.norm(descriptors[a] - descriptors[b]) for b in names] for a in names])
    off = d[np.triu_indices(len(names), 1)]
    assert off.min() > 0.15, off.min()  # no two people are the same photo
    test = [i for i, n in enumerate(names) if n.startswith("test")]
    pairs = [d[i, j] for i in test for j in test if i < j]
    assert min(pairs) > 0.35, pairs  # the test people are told apart from each other
    # the two source photos are two people by dlib's own threshold
    assert d[names.index("id00"), names.index("id01")] > 0.6


def test_identity_is_deterministic_and_its_face_is_where_it_was_built():
    spec = next(s for s in IDENTITIES if s.name == "id02")
    a, b = build_identity(spec), build_identity(spec)
    assert np.array_equal(a.image, b.image) and np.allclose(a.landmarks, b.landmarks)
    assert a.image.shape == source_photo(spec.base).image.shape
    masks = region_masks(a.image.shape[:2], a.landmarks)
    cx, cy = a.face_centre
    assert masks.face[int(cy), int(cx)] > 0.9 and masks.person[int(cy), int(cx)] > 0.9
    assert masks.face[0, 0] < 0.01 and masks.person[0, 0] < 0.01  # the corner is background


def test_heldout_puts_the_test_people_apart(tmp_path):
    train_spec = next(s for s in SAMPLE_SPECS if s.split == "train")
    test_spec = next(s for s in SAMPLE_SPECS if s.split == "test")
    paths = generate_samples(tmp_path, seconds=1.0, specs=(train_spec, test_spec), heldout=True)
    test_dir, train_dir = SPLIT_FOLDERS
    assert paths[0].parent.name == train_dir and paths[1].parent.name == test_dir
    with pytest.raises(ValueError, match="both"):
        generate_samples(tmp_path / "x", seconds=1.0, specs=(train_spec,), heldout=True)
