"""Checkpoint and resume, stop signals, and processes that vanish."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
from PIL import Image

import checkpoint
import data
import errors
import train
from conftest import ROOT
from helpers import (SMALL, assert_shows, device_env, free_port, latest_checkpoint, make_images, outer_record,
                     read_metrics, run_train, start_train, wait_for_records)
from model import ConvNet

RUN = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "3"]
OUTCOMES = ("step", "loss", "train_accuracy", "validation_accuracy", "best_validation_accuracy", "validation_correct")


def outcomes(output_dir):
    return [{k: r[k] for k in OUTCOMES} for r in read_metrics(output_dir)[1]]


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    # Its validation accuracy falls after outer loop 1 (0.5, 0.1), then climbs again (SGD at rate 3, which did
    # this before, blows up: loss 26 at outer loop 2, and stops there).
    run = [*RUN, "--optimiser", "adam", "--learning-rate", "0.03"]
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "whole")])
    train.main([*run, "--outer-steps", "2", "--output-dir", str(tmp_path / "parts")])
    # The best checkpoint is not the latest (for the run and for orbax): resuming from the best would show.
    checkpoints = checkpoint.manager(str(tmp_path / "parts"), keep=2)
    assert (checkpoints.latest_step(), checkpoints.best_step()) == (2, 1)
    checkpoints.close()
    assert read_metrics(tmp_path / "parts")[2]["best"]["outer"] == 1
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "parts"), "--resume"])
    assert outcomes(tmp_path / "parts") == outcomes(tmp_path / "whole")
    assert [r["outer"] for r in read_metrics(tmp_path / "parts")[1]] == [1, 2, 3, 4]
    outer, resumed = latest_checkpoint(tmp_path / "parts")
    assert outer == 4
    assert_same_tree(resumed, latest_checkpoint(tmp_path / "whole")[1])  # params, optimiser state, step, best
    assert (tmp_path / "parts" / "best_params.msgpack").read_bytes() == \
        (tmp_path / "whole" / "best_params.msgpack").read_bytes()
    with open(tmp_path / "parts" / "metrics.jsonl") as f:  # from the latest checkpoint: no outer loop redone
        assert [json.loads(line)["resumed_after_outer"] for line in f if "resumed_after_outer" in line] == [2]


@pytest.mark.parametrize("optimiser", ["muon", "lbfgs"])
def test_the_later_optimisers_resume_bit_for_bit_and_their_inner_loops_agree(tmp_path, optimiser):
    """Muon's momenta and L-BFGS's curvature pairs and line-search state live in the optimiser state: a resumed
    run equals the uninterrupted one bit for bit; for L-BFGS, whose step holds a line search's loop, the
    compiled inner loop gives the Python loop's steps and loss evaluations (Muon's step is a plain update)."""
    run = [*RUN, "--optimiser", optimiser, "--inner-loop", "python"]
    train.main([*run, "--outer-steps", "2", "--output-dir", str(tmp_path / "whole")])
    train.main([*run, "--outer-steps", "1", "--output-dir", str(tmp_path / "parts")])
    train.main([*run, "--outer-steps", "2", "--output-dir", str(tmp_path / "parts"), "--resume"])
    assert outcomes(tmp_path / "parts") == outcomes(tmp_path / "whole")
    assert_same_tree(latest_checkpoint(tmp_path / "parts")[1], latest_checkpoint(tmp_path / "whole")[1])
    if optimiser != "lbfgs":
        return
    compiled = [*RUN, "--optimiser", optimiser, "--inner-loop", "compiled", "--outer-steps", "2"]
    train.main([*compiled, "--output-dir", str(tmp_path / "compiled")])
    records = {mode: read_metrics(tmp_path / mode)[1] for mode in ("whole", "compiled")}
    np.testing.assert_allclose([r["loss"] for r in records["compiled"]], [r["loss"] for r in records["whole"]],
                               rtol=1e-4)
    assert [r["evaluations"] for r in records["compiled"]] == [r["evaluations"] for r in records["whole"]]
    assert all(r["evaluations"] > 3 and r["line_search_failures"] == 0 for r in records["whole"])  # 3 steps


def test_an_lbfgs_run_whose_line_search_finds_no_decrease_stops_with_exit_code_3(tmp_path, capsys):
    """A first trial step 1e30 times the direction: no sufficient decrease within the line search's 20 halvings.
    The run stops after its first outer loop with one line; it is recorded, then marked diverged, and not
    checkpointed, so a resume redoes it (after a failure the line search makes no step and says nothing)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*RUN, "--optimiser", "lbfgs", "--learning-rate", "1e30", "--outer-steps", "3",
                    "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 3
    message = [line for line in capsys.readouterr().err.splitlines() if "line search" in line]
    assert len(message) == 1 and "found no sufficient decrease in 1 of the 3 steps of outer loop 1 " in message[0]
    records = read_metrics(tmp_path)[1]  # the outer loop's record, then the line marking it diverged
    assert [(r["outer"], bool(r.get("diverged"))) for r in records] == [(1, False), (1, True)]
    assert records[0]["line_search_failures"] == 1 == records[1]["line_search_failures"]
    assert records[0]["evaluations"] == 3 + 20 + 1 + 1  # one a step; the failed search its limit of 20, then one each
    assert read_metrics(tmp_path)[2] is None
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_an_lbfgs_line_search_short_of_a_decrease_in_the_last_outer_loop_is_divergence_too(tmp_path):
    """Nothing is left to train there, but its steps after the failure went nowhere: no summary, exit 3."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*RUN, "--optimiser", "lbfgs", "--learning-rate", "1e30", "--outer-steps", "1",
                    "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 3 and read_metrics(tmp_path)[2] is None


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    train.main([*RUN, "--outer-steps", "6", "--keep-checkpoints", "2", "--optimiser", "adam",
                "--learning-rate", "0.02", "--output-dir", str(tmp_path)])
    records = read_metrics(tmp_path)[1]
    best = max(records, key=lambda r: (r["validation_accuracy"], r["outer"]))["outer"]
    assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints")) == sorted({5, 6, best})


# The run that the stopped and the killed runs below are resumed to, uninterrupted, on one process of 8
# devices (this one's): made once, in this process. A copy of it is also the finished run that the refusals
# below meet.
INTERRUPTED = [*RUN, "--inner-steps", "5", "--outer-steps", "10", "--schedule", "warmup_cosine", "--warmup-steps", "6"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    train.main([*INTERRUPTED, "--output-dir", str(output_dir)])
    return outcomes(output_dir), latest_checkpoint(output_dir)[1], output_dir


def test_a_checkpoint_of_a_different_run_is_refused(tmp_path, capsys, uninterrupted):
    shutil.copytree(uninterrupted[2], tmp_path, dirs_exist_ok=True)
    for change, message in [(["--optimiser", "adam"], "--optimiser 'lamb' -> 'adam'"),
                            (["--channels", "8,32"], "--channels [8, 16] -> [8, 32]"),
                            (["--inner-steps", "4"], "--inner-steps 5 -> 4"),
                            (["--schedule", "warmup_linear"], "--schedule 'warmup_cosine' -> 'warmup_linear'")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train.main([*INTERRUPTED, "--output-dir", str(tmp_path), *change])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("train.py: error:") and "holds a checkpoint of a different run" in error
        assert message in error and "\n" not in error
    assert [r["outer"] for r in read_metrics(tmp_path)[1]] == list(range(1, 11))  # nothing overwritten


def test_a_scheduled_run_cannot_change_its_length_on_resume(tmp_path, capsys, uninterrupted):
    shutil.copytree(uninterrupted[2], tmp_path, dirs_exist_ok=True)  # a warmup_cosine run of 10 outer loops
    with pytest.raises(SystemExit):
        train.main([*INTERRUPTED, "--outer-steps", "12", "--output-dir", str(tmp_path)])
    assert "--outer-steps 10 -> 12" in capsys.readouterr().err


def test_a_stop_signal_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_result(tmp_path, request, capsys):
    """SIGTERM here; a stop by SIGINT, which takes the same path, is checked as far as its checkpoint in
    test_sigterms_after_the_clean_stop_are_ignored_to_the_very_end (one process for both)."""
    signum = signal.SIGTERM
    args = [*INTERRUPTED, "--output-dir", str(tmp_path / "stopped")]
    process = start_train(args)
    wait_for_records(tmp_path / "stopped", 2, process)
    process.send_signal(signum)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "Traceback" not in stderr
    assert last.startswith(f"train.py: stopped by {signal.Signals(signum).name} during outer loop ")
    assert "resumes it (run the same command)" in last
    checkpointed = latest_checkpoint(tmp_path / "stopped")[0]
    assert 2 <= checkpointed < 10 and f"checkpoint after outer loop {checkpointed} " in last
    assert (tmp_path / "stopped" / "curves.png").exists()  # drawn as the stopped run's log closed
    capsys.readouterr()
    train.main(args)  # resumed in this process (no new one to start), as the uninterrupted run was made
    assert f"resuming after outer loop {checkpointed}" in capsys.readouterr().out
    whole, whole_checkpoint, _ = request.getfixturevalue("uninterrupted")
    assert outcomes(tmp_path / "stopped") == whole
    assert_same_tree(latest_checkpoint(tmp_path / "stopped")[1], whole_checkpoint)


# Seconds two processes of 4 devices may take to their first outer loops: on a loaded 2-core machine their
# start (each compiles the run's programs for its layout, shared by no other test's) took over 120 s.
TWO_PROCESSES_START = 300


def test_a_dead_process_stops_the_others_in_bounded_time_and_its_checkpoint_resumes(tmp_path, uninterrupted,
                                                                                     capsys):
    """Also the device-layout invariance across hosts: the outer loops of 2 processes x 4 devices, and those
    resumed from their checkpoint by 1 x 8, equal the uninterrupted run on 1 x 8."""
    args = [*INTERRUPTED, "--distributed-timeout", "10", "--output-dir", str(tmp_path / "killed")]
    port = free_port()
    processes = [start_train(args, devices=4, process_id=i, port=port) for i in range(2)]
    wait_for_records(tmp_path / "killed", 3, processes[0], timeout=TWO_PROCESSES_START)
    processes[1].kill()
    killed_at = time.monotonic()
    stdout, stderr = processes[0].communicate(timeout=120)
    assert processes[0].returncode != 0
    assert time.monotonic() - killed_at < 10 + 30  # the heartbeat timeout, and slack for a loaded machine
    assert "another task died" in stderr or "unhealthy" in stderr, stderr[-3000:]
    assert "outer 1/10" in stdout and "outer" not in processes[1].communicate()[0]  # process 0 alone reports
    checkpointed = latest_checkpoint(tmp_path / "killed")[0]
    assert 2 <= checkpointed < 10
    # Resumed by one process of 8 devices (this one): the run does not depend on how devices are spread over hosts.
    capsys.readouterr()
    train.main(args)
    assert f"resuming after outer loop {checkpointed}" in capsys.readouterr().out
    header, records, _ = read_metrics(tmp_path / "killed")
    assert header["processes"] == 2 and header["devices"] == 8 and header["train_examples"] == 240
    assert [r["outer"] for r in records] == list(range(1, 11))
    resumed, whole = outcomes(tmp_path / "killed"), [dict(r) for r in uninterrupted[0]]  # on 1 x 8
    np.testing.assert_allclose([r.pop("loss") for r in resumed], [r.pop("loss") for r in whole], rtol=1e-5)
    assert resumed == whole  # accuracies and which images were right


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
    process = start_train([*RUN, "--outer-steps", "200", "--output-dir", str(tmp_path)])
    wait_for_records(tmp_path, 2, process)
    process.kill()
    process.communicate()
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert "config" in lines[0] and [r["outer"] for r in lines[1:3]] == [1, 2]


@pytest.mark.parametrize("inner_loop,signalled", [("python", [1]), ("compiled", [0, 1])])
def test_processes_signalled_at_different_moments_stop_together_after_the_same_outer_loop(
        tmp_path, inner_loop, signalled):
    """A pod's preemption reaches its hosts at different moments (or only some of them): every process must
    agree to stop at the same boundary, leave the same checkpoint, and exit 128 + signal; none may wait for
    the others at an all-reduce forever. The Python inner loop stops within its outer loop, every process
    after the same step: the signal comes half an outer loop after the second one's record, timed by that
    loop's own steps (the first also compiles), so it lands inside the third whatever the machine's speed."""
    inner = 40 if inner_loop == "python" else 5
    args = [*RUN, "--inner-steps", str(inner), "--outer-steps", "40", "--inner-loop", inner_loop,
            "--output-dir", str(tmp_path)]
    port = free_port()
    processes = [start_train(args, devices=4, process_id=i, port=port) for i in range(2)]
    try:
        if inner_loop == "python":
            wait_for_records(tmp_path, 2, processes[0], timeout=TWO_PROCESSES_START)
            time.sleep(outer_record(tmp_path, 2)["inner_seconds"] / 2)
        else:  # the compiled loop stops between outer loops: any moment will do
            wait_for_records(tmp_path, 1, processes[0], timeout=TWO_PROCESSES_START)
        for number, process in enumerate(signalled):
            time.sleep(0.5 * bool(number))
            processes[process].send_signal(signal.SIGTERM)
        errors = [p.communicate(timeout=120)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, errors[0][-2000:] + errors[1][-2000:]
    lasts = [[line for line in e.splitlines() if line.strip()][-1] for e in errors]
    checkpointed = latest_checkpoint(tmp_path)[0]
    for last in lasts:
        assert last.startswith("train.py: stopped by SIGTERM during outer loop ")
        assert f"the checkpoint after outer loop {checkpointed} " in last
    assert lasts[0] == lasts[1]  # the same outer loop, the same step within it, the same checkpoint
    assert [r["outer"] for r in read_metrics(tmp_path)[1]][-1] == checkpointed
    if inner_loop == "python":  # within the outer loop, not at its end
        steps_done = int(lasts[0].split(" after ")[1].split(f" of its {inner} steps")[0])
        assert 0 < steps_done < inner, lasts[0]


# A run of 2 outer loops that three tests below start from (each works on a copy): made once, watching when
# its checkpoints are saved. (A module fixture is made before any test's own fixtures, so this run draws its
# curves.png whichever test asks for it first: see conftest.curves_only_where_looked_at.)
TWO_OUTER_LOOPS = [*RUN, "--outer-steps", "2", "--target-accuracy", "0.01"]


@pytest.fixture(scope="module")
def two_outer_loops(tmp_path_factory):
    """(its folder, (outer loop, whether curves.png existed) at each checkpoint save)."""
    output_dir, seen, save = tmp_path_factory.mktemp("two-outer-loops"), [], checkpoint.save

    def watched_save(checkpoints, state, best_params, progress, accuracy):
        seen.append((progress["outer"], (output_dir / "curves.png").exists()))
        return save(checkpoints, state, best_params, progress, accuracy)
    checkpoint.save = watched_save
    try:
        train.main([*TWO_OUTER_LOOPS, "--output-dir", str(output_dir)])
    finally:
        checkpoint.save = save
    return output_dir, seen


@pytest.mark.draws_curves
def test_a_finished_runs_curves_are_drawn_before_its_last_checkpoint(two_outer_loops):
    """A finished run is never trained again, so its picture must be complete before the checkpoint that
    marks it finished (a process killed after that checkpoint would otherwise leave none)."""
    assert two_outer_loops[1] == [(1, False), (2, True)]


def test_a_resumed_run_recomputes_the_target_from_its_records(tmp_path, two_outer_loops):
    """--target-accuracy is a reporting setting: a resume that asks for another must not report the old one."""
    shutil.copytree(two_outer_loops[0], tmp_path, dirs_exist_ok=True)  # its target: 0.01
    assert read_metrics(tmp_path)[2]["target"]["outer"] == 1
    train.main([*RUN, "--outer-steps", "3", "--target-accuracy", "0.999", "--output-dir", str(tmp_path)])
    header, records, summary = read_metrics(tmp_path)
    assert max(r["validation_accuracy"] for r in records) < 0.999 and summary["target"] is None
    # The resume line carries the extended run's config, and report.py reads it.
    with open(tmp_path / "metrics.jsonl") as f:
        resumed = [json.loads(line) for line in f if "resumed_after_outer" in line]
    assert resumed[0]["config"]["outer_steps"] == 3 and header["config"]["outer_steps"] == 2
    import report
    shutil.copy(tmp_path / "metrics.jsonl", tmp_path / "extended.metrics.jsonl")
    (run,) = report.load_runs(str(tmp_path))
    assert run["config"]["outer_steps"] == 3 and run["config"]["target_accuracy"] == 0.999


def test_a_folder_whose_checkpoints_are_gone_keeps_its_metrics_aside_and_trains_afresh(tmp_path, capsys,
                                                                                        two_outer_loops):
    """Its metrics.jsonl holds a run (checkpoints deleted, or a kill between an outer loop's record and its
    checkpoint): the run starts over, and the old records are kept in a file of their own, not written over.
    The event files that mirror them go aside with them: TensorBoard showed every step twice."""
    shutil.copytree(two_outer_loops[0], tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "metrics.jsonl").read_text()
    old_records = read_metrics(tmp_path)[1]
    shutil.rmtree(tmp_path / "checkpoints")
    capsys.readouterr()
    train.main([*TWO_OUTER_LOOPS, "--output-dir", str(tmp_path)])
    (kept,) = tmp_path.glob("metrics.jsonl.*.old")
    assert kept.read_text() == before
    assert f"holds the metrics of a run but no checkpoint to resume it from: they are kept as {kept.name}, and the " \
           "run starts afresh" in capsys.readouterr().out
    records = read_metrics(tmp_path)[1]
    assert [r["step"] for r in records] == [3, 6] and "resumed_after_outer" not in before
    assert_shows(tmp_path, records)  # each step once, the new run's
    (aside,) = tmp_path.glob("events.*.old")
    assert aside.name == f"events.{kept.name.split('.')[2]}.old"  # named as the kept metrics
    assert_shows(aside, old_records)  # the old run, whole, as a run of its own
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert len(events.Tensors("run/text_summary")) == 1  # the run's definition once


def test_rerunning_a_finished_run_changes_nothing(tmp_path, capsys):
    command = [*RUN, "--outer-steps", "3", "--target-accuracy", "0.01", "--stop-at-target",
               "--output-dir", str(tmp_path)]
    train.main(command)
    before = (tmp_path / "metrics.jsonl").read_text()
    _, records, summary = read_metrics(tmp_path)
    assert [r["outer"] for r in records] == [1]  # the target is reached at once, and the run stops
    assert summary["target"] == {k: records[0][k] for k in ("outer", "step", "train_seconds", "elapsed_seconds")}
    for _ in range(2):
        capsys.readouterr()
        train.main(command)
        assert "finished earlier (outer loop 1 of 3, target reached); nothing to train" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert latest_checkpoint(tmp_path)[0] == 1
    # Stopped between its last checkpoint and its summary: a re-run adds the summary, and only that.
    (tmp_path / "metrics.jsonl").write_text("".join(before.splitlines(keepends=True)[:-1]))
    train.main(command)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    train.main([*command, "--eval-test"])  # the test accuracy asked for later joins the summary
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert "".join(lines[:-1]) == "".join(before.splitlines(keepends=True)[:-1])
    assert 0 <= json.loads(lines[-1])["summary"]["test_accuracy"] <= 1


def test_a_checkpoint_of_another_image_folder_is_refused_and_the_same_images_elsewhere_resume(tmp_path, capsys):
    first = make_images(tmp_path / "first", per_class=40)  # 8 validation images: one per device
    shutil.copytree(first, tmp_path / "copy")
    shutil.copytree(first, tmp_path / "other")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "other" / "River" / "River_0.png")  # one image replaced
    (tmp_path / "other" / "River" / "River_0.jpg").unlink()
    folder = ["--dataset", "folder", "--channels", "4", "--dense", "4", "--inner-steps", "1",
              "--output-dir", str(tmp_path / "run")]
    train.main([*folder, "--data-dir", str(first), "--outer-steps", "1"])
    with pytest.raises(SystemExit) as exit_info:
        train.main([*folder, "--data-dir", str(tmp_path / "other"), "--outer-steps", "2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "holds a checkpoint of a different run (--data-dir '80 images, sha256" in error
    train.main([*folder, "--data-dir", str(tmp_path / "copy"), "--outer-steps", "2"])  # same images, other path
    assert "resuming after outer loop 1" in capsys.readouterr().out


@pytest.mark.draws_curves
def test_an_update_that_blows_up_the_params_is_caught_in_its_own_outer_loop(tmp_path, capsys):
    """The loss checked is the one before the last update, so divergence shows in the logits after it: the
    outer loop whose update blew up is never recorded or kept as the best. (In this process: the exit code and
    the message are exit_on_failure's, the same here as in a process of its own.)"""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*RUN, "--inner-steps", "1", "--outer-steps", "4", "--optimiser", "adam", "--learning-rate", "1e30",
                    "--schedule", "warmup_linear", "--warmup-steps", "2", "--output-dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 3, stderr[-2000:]
    message = [line for line in stderr.splitlines() if "diverged" in line]
    assert len(message) == 1 and "logits are not finite after outer loop 2 " in message[0], stderr[-2000:]
    assert (tmp_path / "curves.png").exists()  # drawn as the diverged run's log closed
    header, records, _ = read_metrics(tmp_path)
    assert [r["outer"] for r in records] == [1, 2] and records[-1].get("diverged")
    # One whole-set step an outer loop: its |G|^2 is the step's gradient norm squared (train.py's slice of SUMS).
    assert records[0]["gradient_square"] == pytest.approx(records[0]["gradient_norm"] ** 2, rel=1e-5)
    best_params = flax.serialization.msgpack_restore((tmp_path / "best_params.msgpack").read_bytes())
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(best_params))
    model = ConvNet(channels=(8, 16), dense=16, conv=header["conv"])  # the run's formulation: its rounding
    validation = data.load_synthetic("validation", 300, 16, 0, 1)
    predictions = np.argmax(np.asarray(model.apply({"params": best_params}, validation.images)), -1)
    assert (predictions == validation.labels).sum() / len(predictions) == records[0]["validation_accuracy"]


def test_a_loss_above_ten_times_chance_is_divergence_finite_or_not():
    """The one rule train.py, sweep.py and report.py judge by: ln(10) = 2.303 is chance for 10 classes."""
    assert not errors.diverged_loss(23.0, 10) and errors.diverged_loss(23.1, 10)  # the line: 10 x 2.303 = 23.03
    assert errors.diverged_loss(7.0, 2) and not errors.diverged_loss(7.0, 10)  # chance for 2 classes is 0.69
    assert not errors.diverged_loss(3.83, 10)  # the highest spike under results/ that a run recovered from
    for loss in (float("nan"), float("inf"), "nan", 2.97e12):  # a diverged record holds a NaN as text
        assert errors.diverged_loss(loss, 10)


def test_a_finite_loss_that_blows_up_stops_the_run_like_a_nan_and_keeps_the_best(tmp_path, capsys):
    """SGD at rate 10 here: outer loop 1 ends at loss 2.26, outer loop 2 at about 5e8, finite (a NaN only comes
    in outer loop 3). It stops at outer loop 2 with exit 3, recorded as diverged, outer loop 1's params kept."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*RUN, "--outer-steps", "2", "--optimiser", "sgd", "--learning-rate", "10",
                    "--output-dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 3, stderr[-2000:]
    message = [line for line in stderr.splitlines() if "diverged" in line]
    assert len(message) == 1 and "is above 10 times the chance loss ln(10) after outer loop 2 (step 6)" in message[0]
    assert "best validation accuracy 0.1000 at outer 1 (kept)" in message[0]
    header, records, summary = read_metrics(tmp_path)
    assert header["classes"] == 10 and summary is None
    assert [r["outer"] for r in records] == [1, 2] and records[-1]["diverged"] and records[-1]["loss"] > 23.1
    assert latest_checkpoint(tmp_path)[0] == 1  # the blown-up outer loop is not checkpointed


def test_a_second_signal_stops_at_once_even_inside_a_compiled_outer_loop(tmp_path):
    """The first signal waits for the outer loop (and its checkpoint); a second one must not wait at all,
    also while the process waits inside a compiled program (where a Python handler cannot run)."""
    process = start_train([*RUN, "--inner-steps", "400", "--outer-steps", "3", "--inner-loop", "compiled",
                           "--output-dir", str(tmp_path)])
    wait_for_records(tmp_path, 1, process)
    deadline = time.monotonic() + 60
    while not (tmp_path / "checkpoints" / "1").is_dir():  # complete: the process is past its save, in outer loop 2
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(1)  # inside outer loop 2: one compiled program of 400 steps, which takes 8 s here
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert time.monotonic() - started < 3, "waited for the compiled outer loop"
    assert stderr.strip().splitlines()[-1].startswith("stopped at once by a second SIGINT")
    # The first signal was still waiting for the outer loop (no clean stop before the second came) ...
    assert "stopped by SIGINT" not in stderr, stderr[-2000:]
    assert read_metrics(tmp_path)[1][-1]["inner_seconds"] > 3  # ... which takes longer than that


def test_sigterms_after_the_clean_stop_are_ignored_to_the_very_end(tmp_path):
    """A pod's late SIGTERMs while the stopped process leaves: Python's teardown puts its handlers back to the
    defaults, so the process must not depend on one in its last second (it ends 130, never killed by -15).
    Before that, the stop by SIGINT itself: the line it ends with and the checkpoint it leaves."""
    process = start_train([*RUN, "--inner-steps", "2", "--outer-steps", "50", "--output-dir", str(tmp_path)])
    wait_for_records(tmp_path, 2, process)
    process.send_signal(signal.SIGINT)
    before = []
    for line in process.stderr:
        before.append(line)
        if line.startswith("train.py: stopped by SIGINT"):
            break
    while process.poll() is None:  # one every few milliseconds until it has gone
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    rest = process.stderr.read()
    stderr = "".join(before) + rest
    assert process.wait(timeout=120) == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("train.py: stopped by SIGINT during outer loop ")
    assert "resumes it (run the same command)" in last
    checkpointed = latest_checkpoint(tmp_path)[0]
    assert 2 <= checkpointed < 50 and f"checkpoint after outer loop {checkpointed} " in last
    assert (tmp_path / "curves.png").exists()  # drawn as the stopped run's log closed
    # (A Ctrl-C there ends the process at once: test_after_a_clean_stop_... below, with no training.)


def test_a_stopped_process_runs_its_exit_functions_then_ends_without_pythons_teardown():
    """Python's teardown (after the exit functions) puts the default signal handlers back, where a late Ctrl-C
    kills the process: a stopped process, its work saved, runs jax's exit functions and ends there."""
    script = (
        "import atexit, signal\n"
        "import errors\n"
        "atexit.register(print, 'exit functions ran', flush=True)\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        print('teardown', flush=True)\n"
        "teardown = Teardown()\n"
        "def stopped():\n"
        "    raise errors.Interrupted(signal.SIGINT, 'during outer loop 1')\n"
        "errors.exit_on_failure('train.py', stopped)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT and result.stdout == "exit functions ran\n", result
    assert result.stderr == "train.py: stopped by SIGINT during outer loop 1\n"


@pytest.mark.parametrize("signalled", [True, False])
def test_after_a_clean_stop_a_late_sigterm_is_ignored_and_a_ctrl_c_exits_130_at_once(signalled):
    """What the watcher does once the work is saved, in a process that got the first signal itself and in one
    that stopped on another process's word (a pod's preemption reaches hosts at different moments)."""
    script = (
        "import os, signal, time\n"
        "from errors import Interrupted\n"
        "from stopping import StopSignals\n"
        "try:\n"
        "    with StopSignals() as stop:\n"
        f"        if {signalled}:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            while stop.received is None:\n"
        "                time.sleep(0.01)\n"
        "        raise Interrupted(signal.SIGTERM, 'during outer loop 2')\n"
        "except Interrupted:\n"
        "    pass\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "print('alive after SIGTERM', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], env=device_env(1), cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    assert result.stdout == "alive after SIGTERM\n" and time.monotonic() - started < 20
    assert result.stderr.strip().splitlines()[-1].startswith("stopped at once by a second SIGINT"), result.stderr


def test_process_0_whose_peers_never_come_ends_with_one_line_and_exit_4(tmp_path):
    """jax would abort it with a stack trace (134) after its own timeout; ours comes first."""
    started = time.monotonic()
    result = run_train([*RUN, "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2",
                        "--process-id", "0", "--distributed-timeout", "3"], devices=4, check=False)
    assert result.returncode == 4 and time.monotonic() - started < 60, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "train.py: error: the 2 processes did not all join within --distributed-timeout 3s: start the same command "
        "on every host (and check the process count and the coordinator's address)"]


@pytest.fixture
def initialized(monkeypatch):
    """jax.distributed.initialize recorded instead of called, on a machine jax takes for a Cloud TPU VM."""
    import parallel
    from jax._src.clusters import cloud_tpu_cluster
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(parallel, "_distributed_started", False)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY"):
        monkeypatch.delenv(name, raising=False)
    return calls


def metadata_of(answers):
    def get_metadata(key):
        return (answers[key], 200) if key in answers else ("", 404)
    return get_metadata


def test_a_cloud_tpu_vm_joins_the_cluster_jax_detects_from_its_metadata(initialized, monkeypatch):
    """A TPU VM made with gcloud (a v3-32: 4 hosts) describes itself through its metadata server only."""
    import config
    import parallel
    from jax._src.clusters import cloud_tpu_cluster
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", metadata_of(
        {"agent-worker-number": "2", "worker-network-endpoints": "a:b:10.0.0.1,a:b:10.0.0.2,a:b:10.0.0.3,a:b:10.0.0.4",
         "tpu-env": ""}))
    assert parallel.tpu_cluster() == "gcetpu"
    assert cloud_tpu_cluster.GceTpuCluster.get_process_count() == 4  # what jax will read there
    waited = []
    joined_within = parallel.joined_within
    monkeypatch.setattr(parallel, "joined_within", lambda timeout, *rest: (waited.append(timeout),
                                                                            joined_within(timeout, *rest)))
    parallel.init_distributed(config.Config(distributed_timeout=7))
    assert initialized == [((), {"cluster_detection_method": "gcetpu", "initialization_timeout": 37,
                                 "heartbeat_timeout_seconds": 7})]
    assert waited == [7]  # our one line comes after --distributed-timeout, before jax's own abort


def test_a_gke_tpu_node_joins_the_cluster_its_environment_describes(initialized, monkeypatch):
    import config
    import parallel
    from jax._src.clusters import cloud_tpu_cluster
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # no metadata server asked
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    monkeypatch.setenv("TPU_WORKER_ID", "1")
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: pytest.fail(f"asked the metadata for {key}"))
    assert parallel.tpu_cluster() == "gketpu"
    parallel.init_distributed(config.Config())
    assert [kwargs["cluster_detection_method"] for _, kwargs in initialized] == ["gketpu"]


def test_a_gpu_or_cpu_box_starts_no_distributed_runtime(initialized, monkeypatch):
    import config
    import parallel
    from jax._src.clusters import cloud_tpu_cluster
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)  # what jax decides without TPU chips
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")  # not a TPU VM: ignored, as jax does
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: pytest.fail(f"asked the metadata for {key}"))
    assert parallel.tpu_cluster() is None
    parallel.init_distributed(config.Config())
    assert initialized == []


def test_a_signal_during_the_last_compiled_outer_loop_still_exits_128_plus_signal(tmp_path):
    """The compiled loop finishes its outer loop, here the run's last: the run is complete and saved, and the
    process still says it was stopped (a preempting supervisor counts on the code)."""
    # 400 steps, as in the second-signal test above: the same compiled program, and seconds long.
    process = start_train([*RUN, "--inner-steps", "400", "--outer-steps", "1", "--inner-loop", "compiled",
                           "--output-dir", str(tmp_path)])
    wait_for_records(tmp_path, 0, process)  # the header: the one outer loop about to start
    time.sleep(1.5)  # past its agreement to start (its compilation and 400 steps of this toy net take seconds more)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        "train.py: stopped by SIGTERM during the last outer loop, which completed the run: its checkpoint and "
        "summary are written, nothing is left to resume")
    assert read_metrics(tmp_path)[2] is not None and latest_checkpoint(tmp_path)[0] == 1


def test_a_drawn_batch_run_is_not_resumed_on_another_device_layout(tmp_path, capsys):
    """Each device draws from its own examples, so the batches depend on the layout: a resume elsewhere would
    silently be another run (review: 2 devices resumed on 1 gave other losses). The run's own layout is this
    process's 8 devices; the other, a process of 1. Adam: the program of test_batches.py's drawn batches."""
    args = [*RUN, "--batch-size", "64", "--optimiser", "adam", "--output-dir", str(tmp_path)]
    train.main([*args, "--outer-steps", "1"])
    result = run_train([*args, "--outer-steps", "2"], devices=1, check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"train.py: error: {tmp_path}: --batch-size 64 draws each device's share from that device's own examples, "
        "so this run's batches depend on its layout, 1 process(es) x 8 devices in all, and this one is 1 x 1: resume "
        "it on its own layout, or start it afresh in another --output-dir")
    assert "finished earlier" in run_train([*args, "--outer-steps", "1"], devices=1).stdout  # nothing to draw
    capsys.readouterr()
    train.main([*args, "--outer-steps", "2"])
    assert "resuming after outer loop 1" in capsys.readouterr().out


def test_a_drawn_batch_checkpoint_written_before_the_layout_was_recorded_resumes_only_on_its_header_s(tmp_path):
    """Its progress has no draw_layout: the metrics header's counts (the run's start) stand for it, and with no
    header the layout cannot be known, so it is refused (it once resumed on any layout, silently). Only the
    progress record is read, so a checkpoint of a stand-in tree is enough."""
    import config as config_module
    import orbax.checkpoint as ocp
    run = config_module.parse([*RUN, "--batch-size", "64", "--optimiser", "adam", "--outer-steps", "2",
                               "--output-dir", str(tmp_path)])
    progress = {**checkpoint.initial_progress(run), "outer": 1}
    del progress["draw_layout"]
    checkpoints = checkpoint.manager(str(tmp_path), 2)
    checkpoints.save(1, args=ocp.args.Composite(tree=ocp.args.StandardSave({"stand_in": np.zeros(1)}),
                                                progress=ocp.args.JsonSave(progress)),
                     metrics={"validation_accuracy": 0.5})
    checkpoints.wait_until_finished()

    def resume_with_header(header):
        if header is None:
            (tmp_path / "metrics.jsonl").unlink(missing_ok=True)
        else:
            (tmp_path / "metrics.jsonl").write_text(json.dumps({"config": {}, **header}) + "\n")
        return checkpoint.resume_point(run, checkpoints)
    assert resume_with_header({"processes": 1, "devices": 8})["outer"] == 1  # this process's own layout
    with pytest.raises(checkpoint.UsageError, match="its layout, 2 process[(]es[)] x 4 devices in all, and this one "
                                                    "is 1 x 8: resume it on its own layout"):
        resume_with_header({"processes": 2, "devices": 4})
    for header in (None, {"devices": 8}):  # no header, or one without the process count
        with pytest.raises(checkpoint.UsageError, match="nor a metrics.jsonl header there says what it was"):
            resume_with_header(header)
    checkpoints.close()
