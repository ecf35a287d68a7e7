"""TensorBoard event files, read back with TensorBoard's own reader: every scalar of every record once per step,
after a stop and a resume too; a sweep's runs in one tree; the committed results turned into events."""
import json
import os
import shutil
import signal

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import report
import sweep
import train
from helpers import SMALL, assert_shows, read_metrics, scalars, start_train, wait_for_records

RUN = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "3"]


def test_a_run_writes_every_scalar_of_every_record_once_per_step(tmp_path):
    # --ema 0.8: the averaged run's program in test_regularisers.py (the decay is a constant of it), compiled once
    train.main([*RUN, "--outer-steps", "3", "--ema", "0.8", "--optimiser", "adam", "--learning-rate", "0.01",
                "--output-dir", str(tmp_path)])
    records = read_metrics(tmp_path)[1]
    assert_shows(tmp_path, records)
    assert {"noise/b_simple_images", "accuracy/validation_ema", "optimiser/learning_rate"} <= set(scalars(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    text = events.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| optimiser | adam |" in text and "| ema | 0.8 |" in text  # the run's definition as text


def test_a_stopped_and_resumed_run_shows_each_step_once(tmp_path):
    """The stop drops an outer loop after its record may be written; the resume redoes it: TensorBoard's
    reader must see one value per step, the resumed ones."""
    # 3 steps: the compiled program of test_compiled_and_python_inner_loops_agree (no compilation of its own)
    args = [*RUN, "--outer-steps", "8", "--inner-loop", "compiled", "--output-dir", str(tmp_path)]
    process = start_train(args)
    wait_for_records(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    latest = max(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())
    shutil.rmtree(tmp_path / "checkpoints" / str(latest))  # as if killed between its record and its checkpoint
    train.main(args)
    assert f'"resumed_after_outer": {latest - 1}' in (tmp_path / "metrics.jsonl").read_text()
    records = read_metrics(tmp_path)[1]
    assert [r["step"] for r in records] == [3 * outer for outer in range(1, 9)]
    assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]) == 2
    assert_shows(tmp_path, records)


def test_a_sweep_s_runs_sit_in_one_tree_named_as_their_folders(tmp_path):
    rows, _ = sweep.run_sweep(*sweep.parse_args(["--optimisers", "adam,sgd", "--adam-rates", "0.01", "--sgd-rates",
                                                 "0.1", "--output-dir", str(tmp_path), *RUN, "--outer-steps", "2"]))
    for row in rows:
        assert_shows(tmp_path / row["run"], read_metrics(tmp_path / row["run"])[1])


def test_measured_runs_become_event_files_without_retraining(tmp_path):
    results = tmp_path / "results" / "cpu-sweep-256x8"
    results.mkdir(parents=True)
    train.main([*RUN, "--outer-steps", "2", "--output-dir", str(tmp_path / "run")])
    (results / "a-run").mkdir()
    (results / "a-run" / "metrics.jsonl").write_text((tmp_path / "run" / "metrics.jsonl").read_text())
    report.main(["--results", str(tmp_path / "results"), "--events", str(tmp_path / "tb")])
    assert_shows(tmp_path / "tb" / "cpu-sweep-256x8" / "a-run", read_metrics(tmp_path / "run")[1])
    with pytest.raises(SystemExit) as exit_info:  # event files add up: refused over an earlier export
        report.main(["--results", str(tmp_path / "results"), "--events", str(tmp_path / "tb")])
    assert exit_info.value.code == 2
    assert json.loads((results / "a-run" / "metrics.jsonl").read_text().splitlines()[0])["config"]
