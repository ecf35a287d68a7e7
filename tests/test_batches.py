"""--batch-size: batches drawn from the data on the devices, every real example once per epoch, reproducibly."""
import functools

import jax
import numpy as np
import pytest

import parallel
import steps
import train
from helpers import SMALL, read_metrics, run_train


def draws(count, per_device_batch, seed, real_per_device):
    """Which slot each device drew at each of `count` steps: (count, devices, per_device_batch)."""
    devices, slots = jax.local_device_count(), 16
    ids = np.tile(np.arange(slots, dtype=np.int32), (devices, 1))  # (devices, slots): each slot's own number
    mask = (np.arange(slots)[None, :] < np.asarray(real_per_device)[:, None]).astype(np.float32)  # padding last
    images = ids.reshape(devices, slots, 1, 1, 1).astype(np.uint8)
    draw = jax.pmap(functools.partial(steps.draw, per_device_batch=per_device_batch), axis_name=parallel.AXIS)
    drawn = []
    for step in range(count):
        x, _, m = draw(*parallel.on_devices(images, ids, mask), np.full(devices, step, np.int32),
                       np.full(devices, seed, np.int32))
        assert np.asarray(m).all()  # padding is never drawn
        drawn.append(np.asarray(x).reshape(devices, per_device_batch))
    return np.stack(drawn)


def test_every_real_example_is_drawn_once_per_epoch_in_an_order_fixed_by_seed_epoch_and_device():
    real = [16] * 7 + [10]  # the last device holds 6 padding slots
    drawn = draws(count=20, per_device_batch=4, seed=3, real_per_device=real)  # 80 draws per device
    for device, count in enumerate(real):
        sequence = drawn[:, device].reshape(-1)  # this device's draws, in order
        for epoch in range(len(sequence) // count):
            assert sorted(sequence[epoch * count:(epoch + 1) * count]) == list(range(count)), (device, epoch)
    assert (drawn[:, 0] != drawn[:, 1]).any()  # each device its own order
    np.testing.assert_array_equal(drawn, draws(count=20, per_device_batch=4, seed=3, real_per_device=real))
    assert (drawn != draws(count=20, per_device_batch=4, seed=4, real_per_device=real)).any()
    epochs = drawn[:, 0].reshape(-1)
    assert list(epochs[:16]) != list(epochs[16:32])  # a new order each epoch


@pytest.mark.parametrize("batch,message", [
    ("0", "--batch-size must be positive (leave it out for the whole set), got 0"),
    ("20000", "--batch-size 20000 is above the 1,920 training examples of a step's whole set"),
    ("100", "--batch-size 100 does not split over the 8 devices: use a batch size that is a multiple of 8, or a "
            "number of devices that divides 100"),
    ("2000000", "--batch-size 2000000 over 1300 steps draws 2^31 examples or more: fewer steps or a smaller batch"),
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
    assert header["examples_per_step"] == 64
    assert [r["examples_seen"] for r in whole] == [256, 512, 768, 1024]
    keys = ("loss", "train_accuracy", "validation_correct", "gradient_norm")
    assert [{k: r[k] for k in keys} for r in parts] == [{k: r[k] for k in keys} for r in whole]
    assert whole[-1]["loss"] < whole[0]["loss"]


def test_a_sweep_over_batch_sizes_gives_steps_and_images_to_the_target_and_plots_them(tmp_path):
    import sweep
    out = tmp_path / "sweep"
    rows, _ = sweep.run_sweep(*sweep.parse_args([
        "--optimisers", "adam", "--learning-rates", "0.01,0.03", "--batch-sizes", "64,256", "--output-dir", str(out),
        *SMALL, "--synthetic-examples", "300", "--inner-steps", "2", "--outer-steps", "6", "--target-accuracy", "0.3",
        "--stop-at-target"]))
    names = {r["run"] for r in rows}
    assert names == {f"adam-lr{rate}-wd0-b{b}-constant-s0" for rate in ("0.01", "0.03") for b in (64, 256)}
    for r in rows:  # each batch size sees as many images per outer loop: 2 steps of 256, 8 of 64
        header, records, _ = read_metrics(out / r["run"])
        assert header["config"]["inner_steps"] == (8 if r["batch_size"] == 64 else 2)
        assert all(rec["examples_seen"] == 512 * rec["outer"] for rec in records)
        if r["target_step"] != "":
            first = next(rec for rec in records if rec["validation_accuracy"] >= 0.3)
            assert r["target_step"] == first["step"] and r["target_images"] == first["step"] * r["batch_size"]
    best = {(b["optimiser"], b["batch_size"]): b for b in sweep.batch_summary(rows)}
    for batch in (64, 256):
        mine = [r for r in rows if r["batch_size"] == batch and r["target_step"] != ""]
        fewest = min((r["target_step"] for r in mine), default=None)
        assert best["adam", batch]["median_steps"] == (fewest if fewest is not None else float("inf"))
    text = (out / "leaderboard.md").read_text()
    assert "## Steps to the target (0.3) against batch size" in text and "| adam | 64 |" in text
    assert (out / "steps_vs_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
