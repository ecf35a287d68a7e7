"""What several test files share: processes with emulated devices, free ports, image folders, metrics, and
what TensorBoard shows of a run."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import ROOT
from metrics import TAGS

SMALL = ["--dataset", "synthetic", "--image-size", "16", "--channels", "8,16", "--dense", "16"]


def device_env(devices: int = 8, **extra) -> dict:
    """The environment of a fresh process with `devices` emulated CPU devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **extra)


def run_train(args, devices=8, extra_env=None, timeout=300, check=True, script="train.py"):
    """train.py (or another entry point) in a fresh process with `devices` emulated CPU devices."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=device_env(devices, **(
        extra_env or {})), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def one_process_cluster() -> list[str]:
    """The flags of a multi-process run of one process: jax.distributed starts for it as on every host of a
    pod (and on every Cloud TPU VM, where jax detects the cluster), so anything that asks jax for a device or
    the process index before the join ends the process."""
    return ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "1", "--process-id", "0"]


def start_train(args, devices=8, process_id=None, port=None):
    """train.py started in the background (one of two processes when `process_id` and `port` are given)."""
    if process_id is not None:
        args = [*args, "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                "--process-id", str(process_id)]
    return subprocess.Popen([sys.executable, "train.py", *args], env=device_env(devices), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return lines[0], [r for r in lines[1:] if "outer" in r], lines[-1].get("summary")


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def make_images(root, corrupt=False, per_class=10, size=(16, 16)):
    """Two class folders of JPEGs (size: width, height) whose red channel counts up; optionally one corrupt."""
    for name in ("Forest", "River"):
        os.makedirs(root / name)
        for i in range(per_class):
            Image.new("RGB", size, (i * 20 % 256, 0, 0)).save(root / name / f"{name}_{i}.jpg")
    if corrupt:
        (root / "River" / "River_3.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def make_folder(root, classes=("Forest", "River", "SeaLake"), per_class=4, size=8):
    """Class folders of random PNG images (lossless: the pixels read back exactly)."""
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i + 1}.png")
    return root


def wait_for_records(output_dir, count, process, timeout=120):
    """Until metrics.jsonl holds `count` outer-loop lines (the run's process must still be alive)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(path):
            with open(path) as f:
                if sum('"outer"' in line for line in f) >= count:
                    return
        time.sleep(0.02)
    raise AssertionError(f"no {count} outer loops in {timeout}s")


def outer_record(output_dir, outer):
    """Outer loop `outer`'s record, read while the run goes on (a later line may still be half written)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return json.loads([line for line in f if '"outer"' in line][outer - 1])


def latest_checkpoint(output_dir):
    checkpoints = ocp.CheckpointManager(os.path.abspath(os.path.join(output_dir, "checkpoints")))
    outer = checkpoints.latest_step()
    tree = checkpoints.restore(outer, args=ocp.args.Composite(tree=ocp.args.StandardRestore())).tree
    checkpoints.close()
    return outer, tree


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for a run folder, as (step, value) pairs."""
    # Imported here: only the tests that read event files pay for it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(records) -> dict[str, list[tuple[int, float]]]:
    """What a run's records say TensorBoard should show: each numeric scalar, each array's update ratio."""
    want = {}
    for r in records:
        for key, value in r.items():
            if key not in ("outer", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                want.setdefault(TAGS.get(key, f"other/{key}"), []).append((r["step"], value))
        for array, ratio in r["update_ratios"].items():
            want.setdefault(f"update_ratio/{array}", []).append((r["step"], ratio))
    return want


def assert_shows(folder, records):
    got, want = scalars(folder), expected(records)
    assert set(got) == set(want)
    for tag, series in want.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in series], tag  # each step once, in order
        for (_, value), (_, wanted) in zip(got[tag], series):
            assert value == pytest.approx(wanted, rel=1e-6), tag  # stored as float32
