"""tf.data pipeline: decode/resize/cache, augmentation on training batches only, weights, cached logits."""

import numpy as np
import pytest

from melanoma_tf import config as C
from melanoma_tf import data as D
from melanoma_tf.pipeline import build_augmenter, class_weights, make_dataset


@pytest.fixture(scope="module")
def frame(synthetic_root):
    return D.load_lesion_data(synthetic_root, check_decode=False).frame.iloc[:40]


def collect(ds):
    xs, ys, ws = [], [], []
    for x, y, w in ds:
        xs.append(x if not isinstance(x, dict) else x["image"])
        ys.append(y.numpy())
        ws.append(w.numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def test_eval_batches_shapes_range_and_order(frame):
    ds = make_dataset(frame["path"].tolist(), frame["label"].to_numpy(), 24, 16)
    x, y, w = collect(ds)
    assert x.shape == (40, 24, 24, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 100, "images stay in [0, 255]"
    np.testing.assert_array_equal(y.ravel(), frame["label"].to_numpy())
    assert y.shape == (40, 1) and (w == 1).all()
    x2, _, _ = collect(ds)
    np.testing.assert_array_equal(x, x2)  # cached, no augmentation, same order


def test_multiclass_labels_are_integers(frame):
    ds = make_dataset(frame["path"].tolist(), frame["label"].to_numpy(), 24, 16, binary=False)
    _, y, _ = collect(ds)
    assert y.shape == (40,) and y.dtype == np.int32


def test_augmentation_only_when_training(frame):
    augmenter = build_augmenter(C.AugmentConfig(), seed=0)
    labels = frame["label"].to_numpy()
    plain, _, _ = collect(make_dataset(frame["path"].tolist(), labels, 24, 8, augmenter=augmenter))
    train = make_dataset(frame["path"].tolist(), labels, 24, 8, training=True, augmenter=augmenter,
                         shuffle=False)
    augmented, y, _ = collect(train)
    np.testing.assert_array_equal(y.ravel(), labels)
    assert augmented.shape == plain.shape
    assert np.abs(augmented - plain).mean() > 1.0, "training batches were not augmented"
    again, _, _ = collect(train)
    assert np.abs(again - augmented).mean() > 1.0, "augmentation should differ between epochs"
    assert 0 <= augmented.min() and augmented.max() <= 255.5


def test_augmenter_off_and_rand_augment():
    off = C.AugmentConfig(flip=False, rotation=0, zoom=0, translate=0, brightness=0, contrast=0,
                          saturation=0, hue=0)
    assert build_augmenter(off, 0) is None
    ra = build_augmenter(C.AugmentConfig(rand_augment=True), 0)
    assert "rand_augment" in [l.name for l in ra.layers]


def test_shuffle_changes_order_keeps_pairs(frame):
    labels = np.arange(len(frame)) % 2
    ds = make_dataset(frame["path"].tolist(), labels, 16, 40, training=True, seed=1,
                      sample_weights=np.arange(len(frame), dtype=np.float32))
    _, y, w = collect(ds)
    assert sorted(w.tolist()) == list(range(len(frame)))
    assert w.tolist() != list(range(len(frame)))
    np.testing.assert_array_equal(y.ravel(), labels[w.astype(int)])  # label travels with its image


def test_cached_teacher_logits_travel_with_images(frame):
    logits = np.arange(len(frame), dtype=np.float32).reshape(-1, 1)
    ds = make_dataset(frame["path"].tolist(), frame["label"].to_numpy(), 16, 8, training=True, seed=3,
                      teacher_logits=logits, sample_weights=np.arange(len(frame), dtype=np.float32))
    for x, _, w in ds:
        assert set(x) == {"image", "teacher_logits"}
        np.testing.assert_array_equal(x["teacher_logits"].numpy().ravel(), w.numpy())


def test_class_weights_balanced():
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 2)
    np.testing.assert_allclose(w, [100 / (2 * 90), 100 / (2 * 10)])
    w7 = class_weights(np.array([0, 0, 1, 5]), 7)
    np.testing.assert_allclose(w7[[0, 1, 5]], [4 / 6, 4 / 3, 4 / 3])
    assert w7[2] == 1.0  # absent class keeps weight 1


def test_file_cache_is_per_image_list(frame, tmp_path):
    prefix = str(tmp_path / "cache")
    half = len(frame) // 2
    first = make_dataset(frame["path"].tolist()[:half], frame["label"].to_numpy()[:half], 16, 8, cache=prefix)
    second = make_dataset(frame["path"].tolist()[half:], frame["label"].to_numpy()[half:], 16, 8, cache=prefix)
    a, _, _ = collect(first)
    b, _, _ = collect(second)
    assert not np.array_equal(a[:4], b[:4]), "the second list must not read the first list's cache"
    assert len(list(tmp_path.glob("cache_16px_*.index"))) == 2
    again, _, _ = collect(make_dataset(frame["path"].tolist()[:half], frame["label"].to_numpy()[:half], 16, 8,
                                       cache=prefix))
    np.testing.assert_array_equal(again, a)
