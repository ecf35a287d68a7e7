"""--batch-size: batches drawn from the data on the devices, every real example once per epoch, reproducibly."""
import functools

import jax
import numpy as np
import pytest

import parallel
import train
from helpers import SMALL, read_metrics, run_train


def draws(steps, per_device_batch, seed, real_per_device):
    """Which slot each device drew at each step: (steps, devices, per_device_batch)."""
    devices, slots = jax.local_device_count(), 16
    ids = np.tile(np.arange(slots, dtype=np.int32), (devices, 1))  # (devices, slots): each slot's own number
    mask = (np.arange(slots)[None, :] < np.asarray(real_per_device)[:, None]).astype(np.float32)  # padding last
    images = ids.reshape(devices, slots, 1, 1, 1).astype(np.uint8)
    draw = jax.pmap(functools.partial(train.draw, per_device_batch=per_device_batch), axis_name=parallel.AXIS)
    drawn = []
    for step in range(steps):
        x, _, m = draw(*parallel.on_devices(images, ids, mask), np.full(devices, step, np.int32),
                       np.full(devices, seed, np.int32))
        assert np.asarray(m).all()  # padding is never drawn
        drawn.append(np.asarray(x).reshape(devices, per_device_batch))
    return np.stack(drawn)


def test_every_real_example_is_drawn_once_per_epoch_in_an_order_fixed_by_seed_epoch_and_device():
    real = [16] * 7 + [10]  # the last device holds 6 padding slots
    drawn = draws(steps=20, per_device_batch=4, seed=3, real_per_device=real)  # 80 draws per device
    for device, count in enumerate(real):
        sequence = drawn[:, device].reshape(-1)  # this device's draws, in order
        for epoch in range(len(sequence) // count):
            assert sorted(sequence[epoch * count:(epoch + 1) * count]) == list(range(count)), (device, epoch)
    assert (drawn[:, 0] != drawn[:, 1]).any()  # each device its own order
    np.testing.assert_array_equal(drawn, draws(steps=20, per_device_batch=4, seed=3, real_per_device=real))
    assert (drawn != draws(steps=20, per_device_batch=4, seed=4, real_per_device=real)).any()
    epochs = drawn[:, 0].reshape(-1)
    assert list(epochs[:16]) != list(epochs[16:32])  # a new order each epoch


@pytest.mark.parametrize("batch,message", [
    ("0", "--batch-size must be positive (leave it out for the whole set), got 0"),
    ("20000", "--batch-size 20000 is above the 1,920 training examples of a step's whole set"),
    ("100", "--batch-size 100 does not split over the 8 devices: use a multiple of 8"),
    # 244 images over 8 devices: 31 slots each, the last holding 27 real ones, so 216 of its 248 forms
    ("1952", "--batch-size 1952 draws 244 examples per device, but a device holds only 216 real ones: use at most "
             "1728"),
])
def test_bad_batch_sizes_end_with_one_line(batch, message):
    examples = "305" if batch == "1952" else "300"
    result = run_train([*SMALL, "--synthetic-examples", examples, "--batch-size", batch], check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"train.py: error: {message}"


def test_a_run_with_drawn_batches_counts_its_examples_and_resumes_to_the_uninterrupted_result(tmp_path):
    run = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "4", "--batch-size", "64", "--optimiser", "adam",
           "--learning-rate", "0.01"]
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "whole")])
    train.main([*run, "--outer-steps", "2", "--output-dir", str(tmp_path / "parts")])
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "parts")])
    header, whole, _ = read_metrics(tmp_path / "whole")
    parts = read_metrics(tmp_path / "parts")[1]
    assert [r["examples_seen"] for r in whole] == [256, 512, 768, 1024]
    keys = ("loss", "train_accuracy", "validation_correct", "gradient_norm")
    assert [{k: r[k] for k in keys} for r in parts] == [{k: r[k] for k in keys} for r in whole]
    assert whole[-1]["loss"] < whole[0]["loss"]
