"""Checkpoint and resume, stop signals, and processes that vanish."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from conftest import ROOT
from helpers import SMALL, read_metrics, run_train
from test_train import free_port

RUN = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "3"]
OUTCOMES = ("step", "loss", "train_accuracy", "validation_accuracy", "best_validation_accuracy")


def outcomes(output_dir):
    return [{k: r[k] for k in OUTCOMES} for r in read_metrics(output_dir)[1]]


def latest_checkpoint(output_dir):
    checkpoints = ocp.CheckpointManager(os.path.abspath(os.path.join(output_dir, "checkpoints")))
    outer = checkpoints.latest_step()
    tree = checkpoints.restore(outer, args=ocp.args.Composite(tree=ocp.args.StandardRestore())).tree
    checkpoints.close()
    return outer, tree


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


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


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    train.main([*RUN, "--outer-steps", "4", "--output-dir", str(tmp_path / "whole")])
    train.main([*RUN, "--outer-steps", "2", "--output-dir", str(tmp_path / "parts")])
    assert latest_checkpoint(tmp_path / "parts")[0] == 2
    train.main([*RUN, "--outer-steps", "4", "--output-dir", str(tmp_path / "parts"), "--resume"])
    assert outcomes(tmp_path / "parts") == outcomes(tmp_path / "whole")
    assert [r["outer"] for r in read_metrics(tmp_path / "parts")[1]] == [1, 2, 3, 4]
    outer, resumed = latest_checkpoint(tmp_path / "parts")
    assert outer == 4
    assert_same_tree(resumed, latest_checkpoint(tmp_path / "whole")[1])  # params, optimiser state, step, best
    assert (tmp_path / "parts" / "best_params.msgpack").read_bytes() == \
        (tmp_path / "whole" / "best_params.msgpack").read_bytes()
    with open(tmp_path / "parts" / "metrics.jsonl") as f:
        assert sum("resumed_after_outer" in line for line in f) == 1


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    train.main([*RUN, "--outer-steps", "6", "--keep-checkpoints", "2", "--optimiser", "adam",
                "--learning-rate", "0.02", "--output-dir", str(tmp_path)])
    records = read_metrics(tmp_path)[1]
    best = max(records, key=lambda r: (r["validation_accuracy"], r["outer"]))["outer"]
    assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints")) == sorted({5, 6, best})


def test_a_checkpoint_of_a_different_run_is_refused(tmp_path, capsys):
    train.main([*RUN, "--outer-steps", "1", "--output-dir", str(tmp_path)])
    for change, message in [(["--optimiser", "adam"], "--optimiser 'lamb' -> 'adam'"),
                            (["--channels", "8,32"], "--channels [8, 16] -> [8, 32]"),
                            (["--inner-steps", "4"], "--inner-steps 3 -> 4"),
                            (["--schedule", "warmup_cosine", "--warmup-steps", "2"],
                             "--schedule 'constant' -> 'warmup_cosine'")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train.main([*RUN, "--outer-steps", "2", "--output-dir", str(tmp_path), *change])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("train.py: error:") and "holds a checkpoint of a different run" in error
        assert message in error and "\n" not in error
    assert [r["outer"] for r in read_metrics(tmp_path)[1]] == [1]  # nothing overwritten


def test_a_scheduled_run_cannot_change_its_length_on_resume(tmp_path, capsys):
    scheduled = [*RUN, "--schedule", "warmup_linear", "--warmup-steps", "2", "--output-dir", str(tmp_path)]
    train.main([*scheduled, "--outer-steps", "1"])
    with pytest.raises(SystemExit):
        train.main([*scheduled, "--outer-steps", "2"])
    assert "--outer-steps 1 -> 2" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_result(tmp_path, signum):
    args = [*RUN, "--inner-steps", "5", "--outer-steps", "40", "--schedule", "warmup_cosine",
            "--warmup-steps", "20", "--output-dir", str(tmp_path / "stopped")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    process = subprocess.Popen([sys.executable, "train.py", *args], env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_records(tmp_path / "stopped", 2, process)
    process.send_signal(signum)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "Traceback" not in stderr
    assert last.startswith(f"train.py: stopped by {signal.Signals(signum).name} during outer loop ")
    assert "resumes it (run the same command)" in last
    checkpointed = latest_checkpoint(tmp_path / "stopped")[0]
    assert 2 <= checkpointed < 40 and f"checkpoint after outer loop {checkpointed} " in last
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM; the resume below is checked once
    resumed = run_train(args)
    assert f"resuming after outer loop {checkpointed}" in resumed.stdout
    run_train([*args[:-1], str(tmp_path / "whole")])
    assert outcomes(tmp_path / "stopped") == outcomes(tmp_path / "whole")
    assert_same_tree(latest_checkpoint(tmp_path / "stopped")[1], latest_checkpoint(tmp_path / "whole")[1])


def test_a_dead_process_stops_the_others_in_bounded_time_and_its_checkpoint_resumes(tmp_path):
    args = [*RUN, "--inner-steps", "5", "--outer-steps", "30", "--distributed-timeout", "10",
            "--output-dir", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "train.py", *args, "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    wait_for_records(tmp_path, 3, processes[0])
    processes[1].kill()
    killed_at = time.monotonic()
    stderr = processes[0].communicate(timeout=120)[1]
    assert processes[0].returncode != 0
    assert time.monotonic() - killed_at < 10 + 30  # the heartbeat timeout, and slack for a loaded machine
    assert "another task died" in stderr or "unhealthy" in stderr, stderr[-3000:]
    processes[1].communicate()
    checkpointed = latest_checkpoint(tmp_path)[0]
    assert checkpointed >= 2
    # Resumed by one process of 8 devices: the run does not depend on how devices are spread over hosts.
    resumed = run_train(args)
    assert f"resuming after outer loop {checkpointed}" in resumed.stdout
    assert [r["outer"] for r in read_metrics(tmp_path)[1]] == list(range(1, 31))


def test_an_unreachable_coordinator_is_reported_within_the_timeout(tmp_path):
    started = time.monotonic()
    result = run_train([*RUN, "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2",
                        "--process-id", "1", "--distributed-timeout", "3"], devices=4, check=False)
    assert result.returncode == 4 and time.monotonic() - started < 60
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("train.py: error: cannot reach the coordinator"), result.stderr
    assert "within --distributed-timeout 3s" in error[0]


def test_metrics_lines_are_on_disk_as_each_outer_loop_ends(tmp_path):
    """What a killed run measured is never lost: every line is flushed when written."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    process = subprocess.Popen([sys.executable, "train.py", *RUN, "--outer-steps", "200", "--output-dir",
                                str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_records(tmp_path, 2, process)
    process.kill()
    process.communicate()
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert "config" in lines[0] and [r["outer"] for r in lines[1:3]] == [1, 2]
