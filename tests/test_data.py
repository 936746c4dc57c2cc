"""HAM10000 reader, missing/corrupt images, lesion-grouped splits and the split manifest."""

import hashlib
import logging
import shutil

import pandas as pd
import pytest

from melanoma_tf import data as D
from melanoma_tf.data import DataError

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"


def write_csv(folder, rows, header=HEADER):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "HAM10000_metadata.csv"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def copy_images(src_root, dst, ids):
    dst.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        shutil.copy(src_root / "images" / f"{image_id}.jpg", dst / f"{image_id}.jpg")


# --------------------------------------------------------------------------- metadata


def test_missing_column_is_named(tmp_path):
    path = write_csv(tmp_path, ["HAM_1,ISIC_1,mel"], header="lesion_id,image_id,diagnosis\n")
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv: missing column\(s\) \['dx'\]"):
        D.read_metadata(path)


def test_unknown_dx_names_row_and_value(tmp_path):
    path = write_csv(tmp_path, ["HAM_1,ISIC_1,mel,histo,50,male,back,x", "HAM_2,ISIC_2,melanoma,histo,50,male,back,x"])
    with pytest.raises(DataError, match=r"row 3: unknown dx value 'melanoma'"):
        D.read_metadata(path)


def test_duplicate_and_empty_ids(tmp_path):
    with pytest.raises(DataError, match=r"row 3: duplicate image_id 'ISIC_1'"):
        D.read_metadata(write_csv(tmp_path / "a", ["HAM_1,ISIC_1,mel,,,,,", "HAM_2,ISIC_1.jpg,nv,,,,,"]))
    with pytest.raises(DataError, match=r"row 2: empty lesion_id"):
        D.read_metadata(write_csv(tmp_path / "b", [",ISIC_1,mel,,,,,"]))
    with pytest.raises(DataError, match="not found"):
        D.read_metadata(tmp_path / "nope.csv")


def test_image_id_with_or_without_suffix(tmp_path):
    frame = D.read_metadata(write_csv(tmp_path, ["HAM_1,ISIC_1.jpg,MEL,,,,,", "HAM_2,ISIC_2,nv,,,,,"]))
    assert frame["image_id"].tolist() == ["ISIC_1", "ISIC_2"]
    assert frame["dx"].tolist() == ["mel", "nv"]


def test_kaggle_two_part_layout(synthetic_root, tmp_path):
    meta = pd.read_csv(synthetic_root / "HAM10000_metadata.csv")
    ids = meta["image_id"].tolist()
    shutil.copy(synthetic_root / "HAM10000_metadata.csv", tmp_path / "HAM10000_metadata.csv")
    copy_images(synthetic_root, tmp_path / "HAM10000_images_part_1", ids[: len(ids) // 2])
    copy_images(synthetic_root, tmp_path / "HAM10000_images_part_2", ids[len(ids) // 2:])
    found = D.load_lesion_data(tmp_path, check_decode=False)
    assert len(found.frame) == len(ids) and not found.missing
    explicit = D.load_lesion_data(tmp_path, image_dirs=("HAM10000_images_part_1", "HAM10000_images_part_2"),
                                  check_decode=False)
    assert sorted(explicit.frame["image_id"]) == sorted(ids)
    with pytest.raises(DataError, match="image folder not found.*part_3"):
        D.load_lesion_data(tmp_path, image_dirs=("HAM10000_images_part_3",))


def test_missing_images_skip_warns_and_error_policy(synthetic_root, tmp_path, caplog):
    meta = pd.read_csv(synthetic_root / "HAM10000_metadata.csv")
    ids = sorted(meta["image_id"])
    shutil.copy(synthetic_root / "HAM10000_metadata.csv", tmp_path / "HAM10000_metadata.csv")
    gone = ids[:7]
    copy_images(synthetic_root, tmp_path / "images", ids[7:])
    with caplog.at_level(logging.WARNING):
        found = D.load_lesion_data(tmp_path, check_decode=False)
    assert found.missing == gone
    assert len(found.frame) == len(ids) - 7
    assert found.summary()["n_missing"] == 7
    assert f"7 of {len(ids)} images" in caplog.text and gone[0] in caplog.text
    with pytest.raises(DataError, match=rf"7 of {len(ids)} images.*{gone[0]}"):
        D.load_lesion_data(tmp_path, on_missing="error", check_decode=False)


def test_corrupt_images_found_before_training(synthetic_root, tmp_path, caplog):
    meta = pd.read_csv(synthetic_root / "HAM10000_metadata.csv")
    ids = sorted(meta["image_id"])
    shutil.copy(synthetic_root / "HAM10000_metadata.csv", tmp_path / "HAM10000_metadata.csv")
    copy_images(synthetic_root, tmp_path / "images", ids)
    (tmp_path / "images" / f"{ids[3]}.jpg").write_bytes(b"this is not a jpeg")
    good = (tmp_path / "images" / f"{ids[5]}.jpg").read_bytes()
    (tmp_path / "images" / f"{ids[5]}.jpg").write_bytes(good[: len(good) // 3])  # truncated
    with caplog.at_level(logging.WARNING):
        found = D.load_lesion_data(tmp_path)
    assert found.unreadable == [ids[3], ids[5]]
    assert ids[3] not in set(found.frame["image_id"])
    assert "2 image file(s) cannot be decoded" in caplog.text
    with pytest.raises(DataError, match=r"2 image file\(s\) cannot be decoded.*" + ids[3]):
        D.load_lesion_data(tmp_path, on_corrupt="error")


def test_labels_binary_and_multiclass(synthetic_root):
    binary = D.load_lesion_data(synthetic_root, check_decode=False)
    assert ((binary.frame["dx"] == "mel") == (binary.frame["label"] == 1)).all()
    multi = D.load_lesion_data(synthetic_root, labels="multiclass", check_decode=False)
    assert multi.label_names == list(D.DX_CLASSES)
    assert (multi.frame["dx"].map(D.DX_CLASSES.index) == multi.frame["label"]).all()


# --------------------------------------------------------------------------- splits


def assert_no_lesion_overlap(frame, split):
    owners = frame.assign(split=split).groupby("lesion_id")["split"].nunique()
    assert (owners == 1).all(), f"{(owners > 1).sum()} lesions are in two splits"


def test_split_groups_lesions_and_is_deterministic(synthetic_root):
    frame = D.load_lesion_data(synthetic_root, check_decode=False).frame
    assert frame["lesion_id"].duplicated().any(), "fixture should contain multi-image lesions"
    split = D.lesion_grouped_split(frame, seed=3)
    assert_no_lesion_overlap(frame, split)
    assert set(split) == {"train", "val", "holdout"}
    shuffled = frame.sample(frac=1.0, random_state=0)
    again = D.lesion_grouped_split(shuffled, seed=3)
    assert (again.loc[frame.index] == split).all(), "split depends on row order"
    other = D.lesion_grouped_split(frame, seed=4)
    assert (other != split).any()
    frac = (split == "holdout").mean()
    assert 0.15 <= frac <= 0.25


def test_kfold_keeps_holdout_fixed(synthetic_root):
    frame = D.load_lesion_data(synthetic_root, check_decode=False).frame
    splits = [D.lesion_grouped_split(frame, seed=1, folds=4, fold=i) for i in range(4)]
    holdouts = [set(frame.index[s == "holdout"]) for s in splits]
    assert all(h == holdouts[0] for h in holdouts)
    vals = [set(frame.index[s == "val"]) for s in splits]
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
    assert set().union(*vals) == set(frame.index) - holdouts[0]
    plain = D.lesion_grouped_split(frame, seed=1)
    assert set(frame.index[plain == "holdout"]) == holdouts[0]
    for s in splits:
        assert_no_lesion_overlap(frame, s)


def test_manifest_hash_and_columns(synthetic_root, tmp_path):
    frame = D.load_lesion_data(synthetic_root, check_decode=False).frame
    frame["split"] = D.lesion_grouped_split(frame, seed=0)
    digest = D.write_split_manifest(frame, tmp_path / "a")
    text = (tmp_path / "a" / "splits.csv").read_text()
    assert text.splitlines()[0] == "image_id,lesion_id,label,split"
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert D.write_split_manifest(frame.sample(frac=1.0, random_state=1), tmp_path / "b") == digest
    back = D.read_split_manifest(tmp_path / "a" / "splits.csv")
    assert len(back) == len(frame) and set(back["split"]) == {"train", "val", "holdout"}


@pytest.mark.realdata
def test_real_metadata_split_no_leak_and_stratified(ham_root):
    frame = D.read_metadata(ham_root / "HAM10000_metadata.csv")
    assert len(frame) == 10015
    frame, _ = D.label_frame(frame, "binary")
    assert frame["lesion_id"].duplicated().any()  # the full metadata has multi-image lesions
    whole = frame["label"].mean()
    # the 5-fold split (the default one is checked on the real subset by the next test)
    split = D.lesion_grouped_split(frame, seed=42, folds=5, fold=2)
    assert_no_lesion_overlap(frame, split)
    for name in ("train", "val", "holdout"):
        assert abs(frame.loc[split == name, "label"].mean() - whole) < 0.01, name
    assert abs((split == "holdout").mean() - 0.2) < 0.02


@pytest.mark.realdata
@pytest.mark.slow
def test_real_subset_reader_counts_missing_and_splits(ham_root):
    found = D.load_lesion_data(ham_root)  # decodes all 5,984 images once
    assert found.n_listed == 10015
    assert len(found.missing) == 4031
    assert len(found.frame) == 5984 and not found.unreadable
    frame = found.frame
    split = D.lesion_grouped_split(frame, seed=42)
    assert_no_lesion_overlap(frame, split)
    whole = frame["label"].mean()
    for name in ("train", "val", "holdout"):
        assert abs(frame.loc[split == name, "label"].mean() - whole) < 0.01, name
    multi, _ = D.label_frame(frame, "multiclass")
    msplit = D.lesion_grouped_split(multi, seed=42)
    assert_no_lesion_overlap(multi, msplit)
    for dx in range(7):
        share = (multi["label"] == dx).mean()
        assert abs((multi.loc[msplit == "holdout", "label"] == dx).mean() - share) < 0.02


def test_decode_check_is_cached_until_a_file_changes(synthetic_root, tmp_path, monkeypatch):
    meta = pd.read_csv(synthetic_root / "HAM10000_metadata.csv")
    ids = sorted(meta["image_id"])[:10]
    copy_images(synthetic_root, tmp_path / "images", ids)
    paths = [str(tmp_path / "images" / f"{i}.jpg") for i in ids]
    assert D.cached_unreadable_images(paths) == []
    calls = []
    monkeypatch.setattr(D, "find_unreadable_images", lambda p: calls.append(p) or [])
    assert D.cached_unreadable_images(paths) == [] and calls == []  # answered from the cache
    (tmp_path / "images" / f"{ids[2]}.jpg").write_bytes(b"broken now")
    monkeypatch.undo()
    assert D.cached_unreadable_images(paths) == [2]  # the changed file invalidates the entry
