"""Geometric verification on rendered frames, and local features in the map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tscm_ros.describe.describer import DEFAULT_MODEL, describer_for
from tscm_ros.describe.local_features import LocalFeatures, extract_local_features
from tscm_ros.detect.verification import CameraIntrinsics, VerificationConfig, verify
from tscm_ros.errors import ConfigError, MapError
from tscm_ros.io.bag import FrameSource
from tscm_ros.map.keyframe_map import KeyframeMap, KeyframeMeta
from tscm_ros.map.storage import FORMAT_VERSION

FOCAL = 60.0 / math.tan(math.radians(35.0))  # the simulator's 70 degree vertical field of view at 160x120
INTRINSICS = CameraIntrinsics(FOCAL, FOCAL, 80.0, 60.0)
CONFIG = VerificationConfig(min_inliers=12)


@pytest.fixture(scope="module")
def revisit_pairs(route_reference, tmp_path_factory):
    """For each frame of a second drive: its true keyframe (the nearest reference frame) and its look-alike
    (the reference frame more than 30 m away that the default model finds most similar)."""
    from conftest import ROUTE

    from tscm_ros.sim.simulate import simulate_route

    revisit = simulate_route(tmp_path_factory.mktemp("revisit") / "bag", traversal=1, appearance_change=0.2, **ROUTE)
    reference = list(FrameSource(route_reference).open())
    queries = list(FrameSource(revisit).open())
    model = describer_for(DEFAULT_MODEL, device="cpu")
    similarity = model.describe([f.image for f in queries]) @ model.describe([f.image for f in reference]).T
    positions = np.array([f.pose.position[:2] for f in reference])
    pairs = []
    for q, frame in enumerate(queries):
        distance = np.linalg.norm(positions - frame.pose.position[:2], axis=1)
        far = np.flatnonzero(distance > 30.0)
        pairs.append((frame.image, reference[int(np.argmin(distance))].image,
                      reference[int(far[np.argmax(similarity[q, far])])].image))
    return pairs


def test_verification_accepts_true_revisits_and_rejects_look_alikes(revisit_pairs):
    true_checks, false_checks = [], []
    for query, true_keyframe, look_alike in revisit_pairs:
        features = extract_local_features(query)
        true_checks.append(verify(features, extract_local_features(true_keyframe), CONFIG, INTRINSICS))
        false_checks.append(verify(features, extract_local_features(look_alike), CONFIG, INTRINSICS))
    accepted = np.mean([c.verified for c in true_checks])
    fooled = np.mean([c.verified for c in false_checks])
    print(f"verified: {accepted:.2f} of true revisits, {fooled:.2f} of look-alikes; median inliers "
          f"{np.median([c.inliers for c in true_checks]):.0f} vs {np.median([c.inliers for c in false_checks]):.0f}")
    assert accepted >= 0.75 and fooled <= 0.1  # measured 0.88 and 0.05
    for check in true_checks:
        if check.verified:  # with intrinsics: a relative pose, unit translation, unit quaternion
            assert np.linalg.norm(check.translation) == pytest.approx(1.0)
            assert np.linalg.norm(check.rotation) == pytest.approx(1.0)


def test_without_intrinsics_verification_fits_the_fundamental_matrix(revisit_pairs):
    query, true_keyframe, _ = revisit_pairs[5]
    check = verify(extract_local_features(query), extract_local_features(true_keyframe), CONFIG)
    assert check.inliers > 0 and check.rotation is None and check.translation is None


def test_featureless_images_are_never_verified():
    blank = np.full((120, 160, 3), 128, np.uint8)
    features = extract_local_features(blank)
    assert len(features) == 0
    assert not verify(features, features, CONFIG, INTRINSICS).verified


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="min_inliers"):
        VerificationConfig(min_inliers=3)
    with pytest.raises(ConfigError, match="4 values"):
        CameraIntrinsics.from_values([100.0, 100.0])
    with pytest.raises(ConfigError, match="fx, fy > 0"):
        CameraIntrinsics(0.0, 100.0, 80.0, 60.0)


def _map_with_features(images) -> KeyframeMap:
    keyframe_map = KeyframeMap(4, "f" * 16, {})
    vectors = np.eye(4, dtype=np.float32)[: len(images)]
    metas = [KeyframeMeta(stamp_ns=i, pose=None, bag="b", local_features=extract_local_features(image))
             for i, image in enumerate(images)]
    keyframe_map.add(vectors, metas)
    return keyframe_map


def test_the_map_stores_local_features_compactly(revisit_pairs, tmp_path):
    images = [pair[1] for pair in revisit_pairs[:3]]
    built = _map_with_features(images)
    built.save(tmp_path / "map")
    loaded = KeyframeMap.load(tmp_path / "map")
    assert loaded.has_local_features
    assert json.loads((tmp_path / "map" / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    for i, image in enumerate(images):
        expected, got = extract_local_features(image), loaded.local_features(i)
        np.testing.assert_array_equal(got.descriptors, expected.descriptors)
        np.testing.assert_allclose(got.keypoints, expected.keypoints, atol=1 / 16)
    size = (tmp_path / "map" / "local_features.npz").stat().st_size
    assert size <= len(images) * (500 * LocalFeatures.BYTES_PER_FEATURE + 1024)


def test_a_corrupt_local_feature_table_names_the_file(revisit_pairs, tmp_path):
    built = _map_with_features([pair[1] for pair in revisit_pairs[:2]])
    built.save(tmp_path / "map")
    table = tmp_path / "map" / "local_features.npz"
    with np.load(table) as data:
        arrays = dict(data)
    arrays["counts"] = arrays["counts"] + 1  # no longer adds up to the stored features
    np.savez(table, **arrays)
    manifest = json.loads((tmp_path / "map" / "manifest.json").read_text())
    import hashlib

    manifest["files"]["local_features.npz"] = {"bytes": table.stat().st_size,
                                               "sha256": hashlib.sha256(table.read_bytes()).hexdigest()}
    (tmp_path / "map" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapError, match="local_features.npz is not a valid local feature table"):
        KeyframeMap.load(tmp_path / "map")
