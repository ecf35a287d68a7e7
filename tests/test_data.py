import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import data
from config import Config
from conftest import SHARED_EUROSAT
from helpers import make_folder


def test_split_bounds_match_the_experiments_sizes():
    assert [data.split_bounds(27_000, s) for s in data.SPLITS] == [(0, 21_600), (21_600, 24_300), (24_300, 27_000)]


@pytest.mark.parametrize("count,processes", [(21_600, 4), (2_700, 4), (10, 3), (2, 3)])
def test_process_slices_are_contiguous_disjoint_and_complete(count, processes):
    slices = [data.process_slice(5, 5 + count, i, processes) for i in range(processes)]
    assert slices[0][0] == 5 and slices[-1][1] == 5 + count
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1


def test_pad_and_shard_pads_with_a_zero_mask():
    split = data.Split(np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3), np.arange(5, dtype=np.int32))
    images, labels, mask = data.pad_and_shard(split, devices=4, per_device=2)
    assert images.shape == (4, 2, 2, 2, 3) and labels.shape == mask.shape == (4, 2)
    np.testing.assert_array_equal(mask.reshape(-1), [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(labels.reshape(-1)[:5], np.arange(5))
    np.testing.assert_array_equal(images.reshape(8, 2, 2, 3)[:5], split.images)


def test_a_process_without_examples_holds_padding_only():
    split = data.Split(np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, np.int32))
    images, labels, mask = data.pad_and_shard(split, devices=2, per_device=3)
    assert images.shape == (2, 3, 2, 2, 3) and images.dtype == np.uint8 and not mask.any()


def test_labels_outside_the_classes_are_refused_with_a_count_and_an_example():
    split = data.Split(np.zeros((5, 2, 2, 3), np.uint8), np.array([0, 9, 10, -1, 3], np.int32))
    with pytest.raises(data.DataError, match=r"the train split has 2 label\(s\) outside 0..9, e.g. 10 at example 2"):
        data.check_labels(split, 10, "train")
    assert data.check_labels(split._replace(labels=np.array([0, 9, 1, 2, 3], np.int32)), 10, "train")


def test_synthetic_is_deterministic_balanced_and_split_per_process():
    a = data.synthetic_dataset(200, 8)
    np.testing.assert_array_equal(a.images, data.synthetic_dataset(200, 8).images)
    assert a.images.shape == (200, 8, 8, 3) and a.images.dtype == np.uint8
    assert np.bincount(a.labels).tolist() == [20] * 10
    parts = [data.load_synthetic("train", 200, 8, i, 3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), a.labels[:160])


def test_folder_source_splits_80_10_10_without_overlap_and_keeps_pixels(tmp_path):
    root = make_folder(tmp_path, per_class=10)
    splits = {s: data.load_folder(str(root), s, 0, 1) for s in data.SPLITS}
    assert [len(splits[s].labels) for s in data.SPLITS] == [24, 3, 3]
    everything = np.concatenate([splits[s].images for s in data.SPLITS])
    assert len({image.tobytes() for image in everything}) == 30  # each image in exactly one split
    classes, paths, labels = data.list_folder(str(root))
    assert classes == ["Forest", "River", "SeaLake"]
    by_pixels = {np.asarray(Image.open(p)).tobytes(): label for p, label in zip(paths, labels)}
    for s in data.SPLITS:
        for image, label in zip(splits[s].images, splits[s].labels):
            assert by_pixels[image.tobytes()] == label
    ids = data.split_ids(Config(dataset="folder", data_dir=str(root)), "validation")  # names, in the split's order
    assert [np.asarray(Image.open(root / name)).tobytes() for name in ids] == [
        image.tobytes() for image in splits["validation"].images]
    halves = [data.load_folder(str(root), "train", i, 2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.images for h in halves]), splits["train"].images)
    assert len(data.load_folder(str(root), "train", 0, 1, train_examples=7).labels) == 7
    empty = data.load_folder(str(root), "train", 2, 3, train_examples=2)  # 2 examples over 3 processes
    assert empty.images.shape == (0, 8, 8, 3) and empty.images.dtype == np.uint8  # padding keeps the shape


@pytest.mark.parametrize("breakage,message", [
    ("missing", "does not exist"),
    ("no_classes", "no class sub-folders"),
    ("empty_class", "has no images"),
    ("corrupt", "cannot read image .*River_2.png"),
    ("grey", "River_2.png is L"),
    ("other_size", "River_2.png differs in size"),
    ("stray_file", "notes.txt is not an image"),
])
def test_bad_folders_raise_a_message_naming_the_problem(tmp_path, breakage, message):
    root = tmp_path / "eurosat"
    if breakage == "no_classes":
        os.makedirs(root)
    elif breakage != "missing":
        make_folder(root)
        broken = root / "River" / "River_2.png"
        if breakage == "empty_class":
            os.makedirs(root / "Highway")
        elif breakage == "corrupt":
            broken.write_bytes(b"not a png")
        elif breakage == "grey":
            Image.new("L", (8, 8)).save(broken)
        elif breakage == "other_size":
            Image.new("RGB", (9, 9)).save(broken)
        else:
            (root / "River" / "notes.txt").write_text("hello")
    with pytest.raises(data.DataError, match=message):
        for split in data.SPLITS:
            data.load_folder(str(root), split, 0, 1)


class FakeEuroSAT:
    """A prepared TFDS builder of `total` examples; image i holds i in its pixels and is labelled i % 10;
    it resolves split strings with TFDS's own slicing rules (tfds.testing.mock_data ignores slices)."""

    def __init__(self, total, tfds):
        self.tfds, self.total = tfds, total
        self.info = SimpleNamespace(splits={"train": SimpleNamespace(num_examples=total)},
                                    features={"image": SimpleNamespace(shape=(4, 4, 3))})
        self.requested = []

    def is_prepared(self):
        return True

    def download_and_prepare(self, download_config=None):
        pass

    def as_dataset(self, split, as_supervised):
        import tensorflow as tf
        self.requested.append(split)
        (bounds,) = self.tfds.core.ReadInstruction.from_spec(split).to_absolute(self.info.splits)
        ids = np.arange(self.total)[bounds.from_:bounds.to]
        images = np.zeros((len(ids), 4, 4, 3), np.uint8)
        images[..., 0], images[..., 1] = (ids % 256)[:, None, None], (ids // 256)[:, None, None]
        return tf.data.Dataset.from_tensor_slices((images, (ids % 10).astype(np.int64)))


@pytest.fixture
def fake_tfds(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = FakeEuroSAT(300, tfds)
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: builder)
    return builder


def ids_of(split):
    return (split.images[:, 0, 0, 0].astype(int) + 256 * split.images[:, 0, 0, 1].astype(int)).tolist()


def test_tfds_splits_are_80_10_10_and_train_examples_never_reach_validation_or_test(fake_tfds):
    assert [ids_of(data.load_tfds(s, None, None, 0, 1)) for s in data.SPLITS] == [
        list(range(240)), list(range(240, 270)), list(range(270, 300))]
    assert ids_of(data.load_tfds("train", None, None, 0, 1, train_examples=7)) == list(range(7))
    assert ids_of(data.load_tfds("validation", None, None, 0, 1, train_examples=7)) == list(range(240, 270))
    for too_many in (241, 250, 301, 100_000):  # above the training split, and above the whole dataset
        with pytest.raises(data.DataError, match=f"--train-examples {too_many} is outside 1..240"):
            data.load_tfds("train", None, None, 0, 1, train_examples=too_many)
    split = data.load_tfds("train", None, None, 0, 1)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.labels, np.arange(240) % 10)


def test_tfds_processes_load_contiguous_disjoint_slices_and_an_empty_one_holds_no_example(fake_tfds):
    parts = [data.load_tfds("validation", None, None, i, 4) for i in range(4)]
    assert sum((ids_of(p) for p in parts), []) == list(range(240, 270))
    assert [len(p.labels) for p in parts] == [8, 8, 7, 7]
    empty = data.load_tfds("train", None, None, 3, 4, train_examples=3)  # 3 examples over 4 processes
    assert empty.images.shape == (0, 4, 4, 3) and empty.labels.shape == (0,)
    assert data.tfds_slice("train", 27_000, 0, 1) == "train[0:21600]"
    assert data.tfds_slice("validation", 27_000, 3, 4) == "train[23625:24300]"
    assert data.tfds_slice("test", 27_000, 0, 1, train_examples=5) == "train[24300:27000]"


def test_tfds_without_data_or_network_fails_fast_with_instructions(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DataError, match="--manual-dir .* holds no EuroSAT.zip"):
        data.load_tfds("train", str(tmp_path / "tfds"), str(tmp_path), 0, 1)


@pytest.mark.skipif(not os.path.isdir(SHARED_EUROSAT), reason="real EuroSAT images not present")
def test_real_eurosat_folder_has_the_documented_classes_and_counts():
    classes, paths, labels = data.list_folder(SHARED_EUROSAT)
    assert len(paths) == 27_000
    assert dict(zip(classes, np.bincount(labels).tolist())) == {
        "AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500, "Industrial": 2500,
        "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000, "River": 2500, "SeaLake": 3000}
    split = data.load_folder(SHARED_EUROSAT, "validation", 0, 10)  # one tenth of validation: 270 images
    assert split.images.shape == (270, 64, 64, 3) and split.images.dtype == np.uint8


def test_which_images_the_folder_source_puts_in_each_split_is_pinned(tmp_path):
    """The folder source's splits come from a fixed permutation (seed 0): a change would silently make every
    earlier result incomparable (its validation images other ones, its test images seen in training). Pinned
    here for a small folder, split by split and image by image (the pixels follow their ids)."""
    root = make_folder(tmp_path / "images", per_class=4)  # 12 images, 3 classes
    c = Config(dataset="folder", data_dir=str(root))
    assert data.split_ids(c, "train") == [
        "SeaLake/SeaLake_2.png", "Forest/Forest_3.png", "River/River_4.png", "River/River_1.png",
        "River/River_2.png", "SeaLake/SeaLake_4.png", "Forest/Forest_1.png", "Forest/Forest_4.png",
        "River/River_3.png", "SeaLake/SeaLake_3.png"]
    assert data.split_ids(c, "validation") == ["SeaLake/SeaLake_1.png"]
    assert data.split_ids(c, "test") == ["Forest/Forest_2.png"]
    train = data.load_folder(str(root), "train", 0, 1)
    for image, label, name in zip(train.images, train.labels, data.split_ids(c, "train")):
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / name)))
        assert label == ["Forest", "River", "SeaLake"].index(name.split("/")[0])


@pytest.mark.skipif(not os.path.isdir(SHARED_EUROSAT), reason="real EuroSAT images not present")
def test_eurosats_splits_from_the_folder_are_the_ones_every_result_used():
    import hashlib
    c = Config(dataset="folder", data_dir=SHARED_EUROSAT)
    digests = {name: hashlib.sha256("\n".join(data.split_ids(c, name)).encode()).hexdigest()[:16]
               for name in data.SPLITS}
    assert digests == {"train": "373b43767db2192c", "validation": "f078c24fd29aac32", "test": "58f1cfd3c4f48322"}
