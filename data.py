"""EuroSAT RGB (through TFDS or a local folder) and a synthetic stand-in, as uint8 arrays per process.

Splits follow the experiment: the first 80% of EuroSAT's single `train` split trains, the next 10%
validates, the last 10% is the held-out test set. Every source computes the same absolute bounds
(`split_bounds`, `limit_train`) and, under several processes, the same contiguous slice per process
(`process_slice`), so `--train-examples` can never reach into the validation or test images.
"""
import concurrent.futures
import functools
import hashlib
import os
import socket
import urllib.parse
from typing import NamedTuple

import numpy as np

from errors import DataError  # noqa: F401  (data.DataError: the failure this module raises)

SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER_SPLIT_SEED = 0  # fixed, not --seed: the test split must never move between runs


class Split(NamedTuple):
    images: np.ndarray  # (n, H, W, 3) uint8
    labels: np.ndarray  # (n,) int32


def split_bounds(total: int, name: str) -> tuple[int, int]:
    """[start, stop) of a named split among `total` examples, rounding like TFDS percent slices."""
    at_80, at_90 = round(total * 0.8), round(total * 0.9)
    return {"train": (0, at_80), "validation": (at_80, at_90), "test": (at_90, total)}[name]


def process_slice(start: int, stop: int, process_index: int, process_count: int) -> tuple[int, int]:
    """This process's contiguous share of [start, stop); the first `remainder` processes get one more."""
    size, remainder = divmod(stop - start, process_count)
    first = start + process_index * size + min(process_index, remainder)
    return first, first + size + (process_index < remainder)


def limit_train(bounds: tuple[int, int], name: str, train_examples: int | None) -> tuple[int, int]:
    """The first `train_examples` of the training split; other splits (and None) unchanged."""
    if name != "train" or train_examples is None:
        return bounds
    start, stop = bounds
    if not 0 < train_examples <= stop - start:
        raise DataError(f"--train-examples {train_examples} is outside 1..{stop - start}, "
                        f"the size of the training split")
    return start, start + train_examples


# ----------------------------------------------------------------------------- synthetic

def synthetic_dataset(total: int, image_size: int, num_classes: int = 10) -> Split:
    """Deterministic images whose class sets a mean colour and a radial ring frequency, plus noise.

    Both cues survive the dihedral transforms, so the task stays learnable under augmentation.
    """
    rng = np.random.default_rng(1234)
    colours = rng.uniform(-40, 40, size=(num_classes, 3))  # (classes, 3)
    labels = (np.arange(total) * 7919 % num_classes).astype(np.int32)  # balanced, interleaved
    axis = np.linspace(-1, 1, image_size)
    radius = np.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)  # (S, S)
    rings = np.stack([np.cos(np.pi * (1 + c % 4) * radius) for c in range(num_classes)])  # (classes, S, S)
    noise = rng.normal(0, 40, size=(total, image_size, image_size, 3))
    images = 128 + colours[labels][:, None, None, :] + 30 * rings[labels][..., None] + noise
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels)


def load_synthetic(name, total, image_size, process_index, process_count, train_examples=None):
    start, stop = limit_train(split_bounds(total, name), name, train_examples)
    first, last = process_slice(start, stop, process_index, process_count)
    full = synthetic_dataset(total, image_size)
    return Split(full.images[first:last], full.labels[first:last])


# ----------------------------------------------------------------------------- folder

def list_folder(root: str) -> tuple[list[str], list[str], np.ndarray]:
    """Class names (sorted folder names), image paths and labels of an extracted-EuroSAT-style folder."""
    if not root:
        raise DataError("--dataset folder needs --data-dir PATH (a folder with one sub-folder per class)")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"data folder {root} has no class sub-folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        others = sorted(set(files) - set(images))
        if others:
            raise DataError(f"{os.path.join(folder, others[0])} is not an image "
                            f"({len(others)} such file(s) in {folder}; expected {'/'.join(IMAGE_SUFFIXES)})")
        if not images:
            raise DataError(f"class folder {folder} has no images")
        paths += [os.path.join(folder, f) for f in images]
        labels += [label] * len(images)
    return classes, paths, np.asarray(labels, np.int32)


def decode_image(path: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            mode, pixels = image.mode, np.asarray(image)
    except Exception as error:  # PIL raises several types for a bad file
        raise DataError(f"cannot read image {path}: {error}") from None
    if mode != "RGB" or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DataError(f"image {path} is {mode} with shape {pixels.shape}; expected RGB (H, W, 3)")
    return pixels


def load_folder(root, name, process_index, process_count, train_examples=None):
    classes, paths, labels = list_folder(root)
    order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(paths))
    start, stop = limit_train(split_bounds(len(paths), name), name, train_examples)
    first, last = process_slice(start, stop, process_index, process_count)
    chosen = order[first:last]
    if not len(chosen):  # this process holds padding only; it still needs the images' shape
        return empty_split(decode_image(paths[order[0]]).shape)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = list(pool.map(decode_image, [paths[i] for i in chosen]))
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        odd = next(paths[i] for i, image in zip(chosen, images) if image.shape != images[0].shape)
        raise DataError(f"image {odd} differs in size from the others ({sorted(shapes)}); all must match")
    return Split(np.stack(images), labels[chosen])


@functools.lru_cache(maxsize=8)
def folder_identity(root: str) -> str:
    """What identifies a folder's data, not its path: the image count and a digest of every image's class,
    file name and bytes (a resume on another folder, or on a changed one, must not pass as the same run).
    About 0.3 s for EuroSAT's 92 MB; computed once per folder and process."""
    classes, paths, labels = list_folder(root)
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        with open(path, "rb") as f:
            digest.update(f"{classes[label]}/{os.path.basename(path)}\n".encode() + f.read())
    return f"{len(paths)} images, sha256 {digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- TFDS

HOW_TO_GET_EUROSAT = (
    "download EuroSAT.zip (RGB, 27,000 images) on a machine with internet and pass its folder as "
    "--manual-dir, or point --data-dir at a TFDS data dir that already holds eurosat/rgb, "
    "or use --dataset folder --data-dir PATH on the extracted zip's image folder")


def check_download_possible(url: str, manual_dir: str | None) -> None:
    """Fail at once, rather than after TFDS's minutes of retries, when EuroSAT cannot be fetched."""
    zip_name = os.path.basename(urllib.parse.urlparse(url).path)
    if manual_dir:
        if not os.path.isfile(os.path.join(manual_dir, zip_name)):
            raise DataError(f"--manual-dir {manual_dir} holds no {zip_name}; {HOW_TO_GET_EUROSAT}")
        return
    address = urllib.parse.urlparse(url)
    try:
        socket.create_connection((address.hostname, address.port or 80), timeout=10).close()
    except OSError as error:
        raise DataError(f"EuroSAT is not prepared in the TFDS data dir and {address.hostname} cannot be "
                        f"reached to download it ({error}); {HOW_TO_GET_EUROSAT}") from None


def empty_split(image_shape) -> Split:
    return Split(np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int32))


def tfds_slice(name, total, process_index, process_count, train_examples=None) -> str | None:
    """This process's share of a split of EuroSAT's `train` (`total` examples) as a TFDS split string with
    absolute bounds, or None when it holds no example."""
    start, stop = limit_train(split_bounds(total, name), name, train_examples)
    first, last = process_slice(start, stop, process_index, process_count)
    return f"train[{first}:{last}]" if last > first else None


def tfds_total(data_dir) -> int:
    """Examples in EuroSAT's one `train` split, from the TFDS metadata."""
    import tensorflow_datasets as tfds
    return tfds.builder("eurosat/rgb", data_dir=data_dir).info.splits["train"].num_examples


def load_tfds(name, data_dir, manual_dir, process_index, process_count, train_examples=None):
    import tensorflow_datasets as tfds
    builder = tfds.builder("eurosat/rgb", data_dir=data_dir)
    if not builder.is_prepared():
        check_download_possible(builder.builder_config.download_url, manual_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as error:  # TFDS surfaces network, checksum and file errors with many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"EuroSAT is not available through TFDS ({reason[:200]}); {HOW_TO_GET_EUROSAT}") from None
    split = tfds_slice(name, tfds_total(data_dir), process_index, process_count, train_examples)
    if split is None:
        return empty_split(builder.info.features["image"].shape)
    images, labels = [], []
    for image, label in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True)):
        images.append(image)
        labels.append(label)
    return Split(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))


def load_split(config, name: str, process_index: int = 0, process_count: int = 1) -> Split:
    """One split's examples for this process, from the source the flags name."""
    if config.dataset == "synthetic":
        return load_synthetic(name, config.synthetic_examples, config.image_size, process_index, process_count,
                              config.train_examples)
    if config.dataset == "folder":
        return load_folder(config.data_dir, name, process_index, process_count, config.train_examples)
    return load_tfds(name, config.data_dir, config.manual_dir, process_index, process_count, config.train_examples)


def split_ids(config, name: str) -> list[str]:
    """What names each example of a whole split, in the split's order (every process's slice in turn):
    the folder source's class/file name, or the example's index in EuroSAT's (or the synthetic) set."""
    if config.dataset == "folder":
        _, paths, _ = list_folder(config.data_dir)
        order = np.random.default_rng(FOLDER_SPLIT_SEED).permutation(len(paths))
        start, stop = limit_train(split_bounds(len(paths), name), name, config.train_examples)
        return [os.path.relpath(paths[i], config.data_dir) for i in order[start:stop]]
    total = config.synthetic_examples if config.dataset == "synthetic" else tfds_total(config.data_dir)
    start, stop = limit_train(split_bounds(total, name), name, config.train_examples)
    return [f"{config.dataset}/{i}" for i in range(start, stop)]


def num_classes(config) -> int:
    return len(list_folder(config.data_dir)[0]) if config.dataset == "folder" else 10


def check_labels(split: Split, classes: int, name: str) -> Split:
    """A label outside 0..classes-1 would silently index a wrong logit (or none): refuse it."""
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= classes))
    if len(bad):
        raise DataError(f"the {name} split has {len(bad)} label(s) outside 0..{classes - 1}, "
                        f"e.g. {split.labels[bad[0]]} at example {bad[0]}")
    return split


# ----------------------------------------------------------------------------- device layout

def pad_and_shard(split: Split, devices: int, per_device: int):
    """(n, H, W, C) -> images (devices, per_device, H, W, C), labels and a 0/1 mask (devices, per_device).

    Padding examples are black, labelled 0 and have mask 0, so they count nowhere. A process may hold no
    example at all (a small split over many hosts); its devices then hold padding only.
    """
    n = len(split.labels)
    total = devices * per_device
    if n > total:
        raise ValueError(f"{n} examples do not fit {devices} x {per_device}")
    padding = np.zeros((total - n, *split.images.shape[1:]), split.images.dtype)
    images = np.concatenate([split.images, padding])  # (total, H, W, C)
    labels = np.concatenate([split.labels, np.zeros(total - n, split.labels.dtype)])  # (total,)
    mask = (np.arange(total) < n).astype(np.float32)  # (total,)
    return (images.reshape(devices, per_device, *images.shape[1:]),  # (D, P, H, W, C)
            labels.reshape(devices, per_device), mask.reshape(devices, per_device))
