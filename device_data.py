"""A run's data on the devices: this process's slice of each split, padded to the same per-device count
on every host, sharded over the local devices, and the training split expanded into its 8 dihedral forms
there (it never leaves the devices again)."""
from typing import NamedTuple

import jax
import numpy as np

import augment
import data
from errors import DataError
from parallel import gather_counts, init_distributed, log, on_devices


class Prepared(NamedTuple):
    """What every run of a process shares: the data on the devices and its counts."""
    train_data: tuple  # images (devices, per_device, H, W, C) uint8, labels (devices, per_device), mask
    val_data: tuple
    train_count: int  # real examples over all hosts, before augmentation
    val_count: int
    stride: int  # 8 when train_data holds the dihedral forms, else 1
    num_classes: int
    val_local_count: int  # this process's validation examples (the first of its devices' slots)
    test: tuple | None = None  # (test_data, test_count) when --eval-test: loaded, and checked, before training
    train_fewest_per_device: int = 0  # real training examples of the device holding the fewest, on any host


def load_split(config, name: str, classes: int) -> data.Split:
    """This process's examples of one split, their labels checked against the classes."""
    split = data.load_split(config, name, process_index=jax.process_index(), process_count=jax.process_count())
    return data.check_labels(split, classes, name)


def prepare_split(split: data.Split, name: str, augmented: bool):
    """This host's examples padded to a common per-device count (the same on every host) and placed."""
    counts = gather_counts(len(split.labels))
    total = int(counts.sum())
    if total < jax.device_count():
        raise DataError(f"the {name} split has {total} examples, fewer than the {jax.device_count()} devices")
    devices = jax.local_device_count()
    per_device = -(-int(counts.max()) // devices)
    padding = jax.device_count() * per_device - total
    images, labels, mask = on_devices(*data.pad_and_shard(split, devices, per_device))
    if augmented:
        images, labels, mask = augment.expand_sharded(images, labels, mask)  # (devices, 8 * per_device, ...)
    log(f"{name}: {total} examples ({' + '.join(map(str, counts))} by process), {per_device} per device, "
        f"{padding} padding (masked out)" + (f", x{augment.NUM_TRANSFORMS} augmented = "
                                             f"{total * augment.NUM_TRANSFORMS} per step" if augmented else ""))
    return (images, labels, mask), total


def fewest_real_per_device(mask) -> int:
    """The smallest number of real examples any device of any process holds."""
    local = int(np.asarray(jax.device_get(mask)).reshape(mask.shape[0], -1).sum(axis=1).min())
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return int(np.asarray(multihost_utils.process_allgather(np.int64(local))).min())


def check_shapes(splits: dict[str, data.Split], augmented: bool) -> None:
    """Every split the run uses holds images of one size (square, for the dihedral forms), checked before
    the first step: a test image of another size must not surface only at the end of a long run."""
    shapes = {name: split.images.shape[1:] for name, split in splits.items() if len(split.labels)}
    if len(set(shapes.values())) > 1:
        raise DataError("the splits' images differ in size (" + ", ".join(
            f"{name} {'x'.join(map(str, shape[:2]))}" for name, shape in shapes.items()) + "); all must match")
    height, width = next(iter(shapes.values()), (1, 1, 3))[:2]
    if augmented and height != width:
        raise DataError(f"the images are {height}x{width} (height x width); the 8 dihedral forms need square "
                        "images: crop them square, or train with --no-augment")


def prepare(config) -> Prepared:
    """Start the processes, load this process's data (every split the run uses, checked before training)
    and put it, the training split augmented, on the devices."""
    init_distributed(config)
    classes = data.num_classes(config)
    log(f"jax {jax.__version__} {jax.default_backend()}: {jax.process_count()} process(es), "
        f"{jax.device_count()} devices ({jax.local_device_count()} local: {jax.local_devices()[0].device_kind})")
    names = ["train", "validation"] + ["test"] * config.eval_test
    splits = {name: load_split(config, name, classes) for name in names}
    check_shapes(splits, not config.no_augment)
    train_data, train_count = prepare_split(splits["train"], "train", not config.no_augment)
    val_data, val_count = prepare_split(splits["validation"], "validation", False)
    test = prepare_split(splits["test"], "test", False) if config.eval_test else None
    stride = 1 if config.no_augment else augment.NUM_TRANSFORMS
    return Prepared(train_data, val_data, train_count, val_count, stride, classes, len(splits["validation"].labels),
                    test, fewest_real_per_device(train_data[2]))
