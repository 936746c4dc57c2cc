"""Teachers named by a pattern (an ensemble per folder) and cached logits shared by the runs of a grid."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from melanoma_tf import config as C
from melanoma_tf import runs
from melanoma_tf.backend import keras
from melanoma_tf.config import ConfigError
from melanoma_tf.distill import teachers


def _teacher(path, seed: int):
    """A small saved teacher: mean colour -> one logit, different per seed."""
    image = keras.Input((32, 32, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    logits = keras.layers.Dense(1, kernel_initializer=keras.initializers.RandomNormal(seed=seed))(pooled)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(image, logits).save(path)
    return path


@pytest.fixture()
def teacher_runs(tmp_path):
    return [_teacher(tmp_path / "teachers" / f"seed{k}" / "model.keras", k) for k in (2, 1, 3)]


def test_a_pattern_names_every_matching_run_as_an_ensemble(teacher_runs, tmp_path):
    (tmp_path / "teachers" / "seed1.log").write_text("a yardstick's log beside its runs")
    found = teachers.resolve_teacher_paths((str(tmp_path / "teachers" / "seed*"),))
    assert found == sorted(teacher_runs)
    both = teachers.resolve_teacher_paths((str(tmp_path / "teachers" / "seed[12]"), str(teacher_runs[2])))
    assert both == [teacher_runs[1], teacher_runs[0], teacher_runs[2]]
    with pytest.raises(ConfigError, match=r"seed9\*.* matches no run folder"):
        teachers.resolve_teacher_paths((str(tmp_path / "teachers" / "seed9*"),))


def test_runs_with_the_same_teacher_and_images_share_its_cached_logits(synthetic_root, teacher_runs, tmp_path,
                                                                       monkeypatch, caplog):
    shared = tmp_path / "shared"
    cfg = C.load(REPO / "configs" / "quickstart.yaml",
                 tiny_overrides(synthetic_root, tmp_path, **{"distill.teacher_cache": str(shared)}))
    data = runs.prepare_data(cfg)
    first = teachers.teacher_logits(teacher_runs, data, cfg, tmp_path / "run1")
    files = list(shared.glob("teacher_logits_*.npz"))
    assert len(files) == 1 and (tmp_path / "run1" / "teacher_logits.npz").is_file()
    assert first.shape == (len(data.part("train")), 1)

    computed = []
    real_logits = teachers._logits
    monkeypatch.setattr(teachers, "_logits", lambda *a: computed.append(1) or real_logits(*a))
    second = teachers.teacher_logits(teacher_runs, data, cfg, tmp_path / "run2")
    assert not computed and np.array_equal(first, second)
    assert np.array_equal(np.load(tmp_path / "run2" / "teacher_logits.npz")["logits"], first)

    # Another training split, another teacher, a damaged file: computed again, never taken.
    other = C.load(REPO / "configs" / "quickstart.yaml",
                   tiny_overrides(synthetic_root, tmp_path, **{"distill.teacher_cache": str(shared),
                                                               "data.split_seed": 5}))
    teachers.teacher_logits(teacher_runs, runs.prepare_data(other), other, tmp_path / "run3")
    assert len(computed) == 1
    teachers.teacher_logits(teacher_runs[:2], data, cfg, tmp_path / "run4")
    assert len(computed) == 2 and len(list(shared.glob("teacher_logits_*.npz"))) == 2
    _teacher(teacher_runs[0], 7)  # trained again at the same path
    os.utime(teacher_runs[0], ns=(1, 1))
    teachers.teacher_logits(teacher_runs, data, cfg, tmp_path / "run5")
    assert len(computed) == 3
    damaged = teachers.shared_cache_file(cfg, teacher_runs, teachers.teacher_resolution(teacher_runs, cfg))
    assert damaged.is_file() and damaged != files[0]
    damaged.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        again = teachers.teacher_logits(teacher_runs, data, cfg, tmp_path / "run6")
    assert len(computed) == 4 and again.shape == first.shape
    assert any(str(damaged) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
