"""Strict typed config: unknown keys, wrong types and ranges, overrides, YAML number quirks."""

import sys
from pathlib import Path

import pytest
import yaml

from melanoma_tf import config as C
from melanoma_tf.config import ConfigError

REPO_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import kd_grid  # noqa: E402


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    assert REPO_CONFIGS, "no configs shipped"
    names = {p.stem for p in REPO_CONFIGS}
    assert {"quickstart", "teacher_resnet50", "student_mobilenetv3", "distill_mobilenetv3"} <= names
    from melanoma_tf.sweep import load_sweep

    for path in REPO_CONFIGS:
        if path.stem.startswith("sweep_"):
            assert load_sweep(path).axes  # every trial of the sweep is a valid config
            continue
        if "design" in (yaml.safe_load(path.read_text()) or {}):  # a KD grid file (tools/kd_grid.py)
            grid = kd_grid.load_grid(path)
            assert grid.design and C.load(grid.config).output.name == grid.config.stem
            continue
        cfg = C.load(path)
        assert cfg.output.name == path.stem


def test_unknown_key_names_key_and_closest_match(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rate'; did you mean 'train\.lr'"):
        C.load(path)
    with pytest.raises(ConfigError, match=r"exp\.yaml"):
        C.load(path)


def test_unknown_section_suggests_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'distil'; did you mean 'distill'"):
        C.load(write(tmp_path, "distil:\n  alpha: 0.5\n"))


@pytest.mark.parametrize("text, key", [
    ("distill:\n  alpha: 1.5\n", "distill.alpha"),
    ("distill:\n  alpha: -0.1\n", "distill.alpha"),
    ("distill:\n  temperature: 0\n", "distill.temperature"),
    ("train:\n  lr: -1.0e-3\n", "train.lr"),
    ("data:\n  image_size: 0\n", "data.image_size"),
    ("data:\n  image_size: -64\n", "data.image_size"),
    ("train:\n  epochs: 2.5\n", "train.epochs"),
    ("train:\n  batch_size: many\n", "train.batch_size"),
    ("student:\n  minimalistic: 'yes'\n", "student.minimalistic"),
    ("student:\n  pooling: mean\n", "student.pooling"),
    ("data:\n  labels: [binary]\n", "data.labels"),
    ("data:\n  folds: 5\n  fold: 5\n", "data.fold"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        C.load(write(tmp_path, text))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) loads 1e-4 as a string; the config must still see a float.
    assert isinstance(yaml.safe_load("lr: 1e-4")["lr"], str)
    cfg = C.load(write(tmp_path, "train:\n  lr: 1e-4\nteacher:\n  finetune_lr: 5E-6\n"))
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.teacher.finetune_lr == pytest.approx(5e-6)


def test_set_overrides_and_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    cfg = C.load(path, ["train.epochs=7", "data.image_size=96", "seed=3", "output.dir=/tmp/x",
                        "data.root=/data/ham", "train.batch_size=16", "train.lr=1e-2", "stages=[teacher,distill]"])
    assert (cfg.train.epochs, cfg.data.image_size, cfg.seed) == (7, 96, 3)
    assert cfg.output.dir == "/tmp/x" and cfg.data.root == "/data/ham" and cfg.train.batch_size == 16
    assert cfg.train.lr == pytest.approx(1e-2)
    assert cfg.stages == ("teacher", "distill")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        C.load(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        C.load(path, ["train.epochs"])


def test_frozen_and_round_trip(tmp_path):
    cfg = C.load(write(tmp_path, "seed: 5\nstages: [teacher, student]\n"))
    with pytest.raises(Exception):
        cfg.seed = 6  # frozen dataclass
    out = tmp_path / "resolved.yaml"
    C.save(cfg, out)
    again = C.load(out)
    assert again == cfg
    assert C.fingerprint(again) == C.fingerprint(cfg)
    assert C.fingerprint(C.replace(cfg, "train.lr", 0.5)) != C.fingerprint(cfg)
    assert C.fingerprint(C.replace(cfg, "output.dir", "elsewhere")) == C.fingerprint(cfg)


def test_stage_rules(tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher"):
        C.load(write(tmp_path, "stages: [distill]\n"))
    with pytest.raises(ConfigError, match="order"):
        C.load(write(tmp_path, "stages: [student, teacher]\n"))
    with pytest.raises(ConfigError, match="stages"):
        C.load(write(tmp_path, "stages: [teacher, trainer]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        C.load(write(tmp_path, "- a\n- b\n"))


def test_relational_settings_are_refused_where_nothing_reads_them():
    with pytest.raises(ConfigError, match="relational: tau, k_pos set, but distill.method is kd"):
        C.from_dict({"relational": {"tau": 0.1, "k_pos": 3}})
    cfg = C.from_dict({"distill": {"method": "relational"}, "relational": {"tau": 0.1}})
    assert cfg.relational.tau == 0.1
