import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import flax
import numpy as np
import pytest

import checkpoint
import config
import data
import sweep
import train
from errors import UsageError
from conftest import ROOT
from helpers import SMALL, device_env, make_folder, one_process_cluster, read_metrics, run_train, wait_for_records
from model import ConvNet

FIXED = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "4", "--outer-steps", "3", "--target-accuracy", "0.3"]


# A tiny sweep that two tests below start from (each works on a copy): made once.
TINY = ["--optimisers", "adam,sgd", "--learning-rates", "0.02,1e8", *FIXED]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """(its folder, its rows and summary)."""
    out = tmp_path_factory.mktemp("tiny-sweep")
    return out, *sweep.run_sweep(*sweep.parse_args([*TINY, "--output-dir", str(out)]))


def test_a_tiny_sweep_ranks_runs_marks_divergence_and_resumes(tmp_path, capsys, tiny_sweep):
    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep[0], out)
    argv = [*TINY, "--output-dir", str(out)]
    rows, summary = tiny_sweep[1:]
    names = {"adam-lr0.02-wd0-constant-s0", "adam-lr1e+08-wd0-constant-s0",
             "sgd-lr0.02-m0.9-constant-s0", "sgd-lr1e+08-m0.9-constant-s0"}
    assert {r["run"] for r in rows} == names
    status = {r["run"]: r["status"] for r in rows}
    assert status["sgd-lr1e+08-m0.9-constant-s0"] == "diverged"
    assert status["adam-lr0.02-wd0-constant-s0"] == status["sgd-lr0.02-m0.9-constant-s0"] == "ok"
    with open(out / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in table] == [1, 2, 3, 4]
    accuracies = [float(r["best_validation_accuracy"]) for r in table]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {r["run"] for r in table} == names
    markdown = (out / "leaderboard.md").read_text()
    assert "diverged" in markdown and "| adam |" in markdown and "| sgd |" in markdown
    for picture in ("curves.png", "accuracy_vs_rate.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {s["optimiser"] for s in summary} == {"adam", "sgd"}
    stamps = {n: os.path.getmtime(out / n / "metrics.jsonl") for n in names}
    for n in names:  # results kept without their checkpoints (as under results/) are finished all the same
        shutil.rmtree(out / n / "checkpoints", ignore_errors=True)
    capsys.readouterr()
    sweep.run_sweep(*sweep.parse_args(argv))
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") + printed.count("ended earlier (diverged or crashed)") == 4
    assert stamps == {n: os.path.getmtime(out / n / "metrics.jsonl") for n in names}


def test_a_sweep_rerun_with_other_fixed_flags_refuses_its_finished_and_diverged_runs(tmp_path, capsys, tiny_sweep):
    """Run names encode only the swept values: results of another definition must never pass for this one."""
    out = str(tmp_path / "sweep")
    shutil.copytree(tiny_sweep[0], out)  # holds the SGD runs of this grid: one finished, one diverged
    assert [r["status"] for r in sweep.leaderboard_rows(sweep.grid_points(*sweep.parse_args(
        ["--optimisers", "sgd", "--learning-rates", "0.02,1e8", "--output-dir", out, *FIXED])))] == ["ok", "diverged"]
    for rate in ("0.02", "1e8"):  # a finished run, then a diverged one
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["--optimisers", "sgd", "--learning-rates", rate, "--output-dir", out, *FIXED,
                        "--inner-steps", "5"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("sweep.py: error:")
        assert "holds the metrics of a different run (--inner-steps 4 -> 5)" in error and "\n" not in error


def test_a_finished_sweep_run_again_with_eval_test_gives_each_finished_run_its_test_accuracy(tmp_path, capsys,
                                                                                             tiny_sweep):
    """The runs finished without --eval-test: the same command with it trains nothing and measures each finished
    run's test accuracy from the best params in its checkpoint, into its summary and the leaderboard; a run
    whose folder holds no checkpoint says it has none."""
    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep[0], out)
    finished = [r["run"] for r in tiny_sweep[1] if r["status"] == "ok"]
    assert len(finished) >= 2 and all(r["test_accuracy"] == "" for r in tiny_sweep[1])
    before = {name: read_metrics(out / name)[1] for name in finished}
    rows = sweep.run_sweep(*sweep.parse_args([*TINY, "--eval-test", "--output-dir", str(out)]))[0]
    rows = {r["run"]: r for r in rows}
    with open(out / "leaderboard.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    test = data.load_synthetic("test", 300, 16, 0, 1)  # FIXED's synthetic set
    for name in finished:
        header, records, summary = read_metrics(out / name)
        assert records == before[name]  # nothing trained
        best_params = flax.serialization.msgpack_restore((out / name / "best_params.msgpack").read_bytes())
        model = ConvNet(channels=(8, 16), dense=16, conv=header["conv"])  # the run's formulation: its rounding
        predictions = np.argmax(np.asarray(model.apply({"params": best_params}, test.images)), -1)
        recount = float(np.mean(predictions == test.labels))
        assert summary["test_accuracy"] == rows[name]["test_accuracy"] == recount
        assert table[name]["test_accuracy"] == f"{recount}"
    # Without a checkpoint (results kept without them, as under results/) there are no best params to measure.
    kept = tmp_path / "kept"
    shutil.copytree(tiny_sweep[0] / finished[0], kept / finished[0])
    shutil.rmtree(kept / finished[0] / "checkpoints")
    point, = [p for p in sweep.grid_points(*sweep.parse_args([*TINY, "--eval-test", "--output-dir", str(kept)]))
              if p.name == finished[0]]
    assert sweep.verdict_of_process_0(point.config) == sweep.UNTESTABLE


def test_every_run_of_a_mixed_sweep_equals_the_same_run_through_train_py_with_one_compile_per_optimiser(
        tmp_path, monkeypatch):
    """Rates, epsilons, decays and seeds live in the optimiser state: a grid over them compiles each
    optimiser's step once, and no run takes another's program (the sweep's key covers the optimiser)."""
    built = []
    build_programs = train.build_programs
    monkeypatch.setattr(train, "build_programs", lambda config, prepared: built.append(config.optimiser) or
                        build_programs(config, prepared))
    # The study's schedule over these 12 steps (test_study.py): the same two programs, compiled once for both
    schedule = ["--schedule", "warmup_cosine", "--warmup-steps", "1"]
    sweep.run_sweep(*sweep.parse_args(["--optimisers", "lamb,sgd", "--lamb-rates", "0.01", "--lamb-epsilons",
                                       "1e-6,1e-3", "--sgd-rates", "0.05", "--seeds", "1", "--weight-decays", "0.01",
                                       *schedule, "--output-dir", str(tmp_path / "sweep"), *FIXED]))
    assert built == ["lamb", "sgd"]
    lamb = ["--optimiser", "lamb", "--learning-rate", "0.01", "--weight-decay", "0.01"]
    for name, flags in [("lamb-lr0.01-wd0.01-warmup_cosine-s1", [*lamb, "--epsilon", "1e-6"]),
                        ("lamb-lr0.01-wd0.01-eps0.001-warmup_cosine-s1", [*lamb, "--epsilon", "1e-3"]),
                        ("sgd-lr0.05-m0.9-warmup_cosine-s1", ["--optimiser", "sgd", "--learning-rate", "0.05"])]:
        train.main([*FIXED, *flags, "--seed", "1", *schedule, "--output-dir", str(tmp_path / name)])
        inside, alone = (read_metrics(tmp_path / folder / name)[1] for folder in ("sweep", "."))
        np.testing.assert_allclose([r["loss"] for r in inside], [r["loss"] for r in alone], rtol=1e-6)
        assert [r["validation_correct"] for r in inside] == [r["validation_correct"] for r in alone]
    losses = [[r["loss"] for r in read_metrics(tmp_path / "sweep" / name)[1]] for name in (
        "lamb-lr0.01-wd0.01-warmup_cosine-s1", "lamb-lr0.01-wd0.01-eps0.001-warmup_cosine-s1")]
    assert losses[0] != losses[1]  # the epsilon reached the step
    assert (tmp_path / "sweep" / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_optimiser_may_have_its_own_rates(tmp_path):
    grid, base = sweep.parse_args(["--optimisers", "lamb,sgd", "--learning-rates", "0.001", "--sgd-rates", "0.1,0.3",
                                   "--seeds", "0,1", "--output-dir", str(tmp_path), *FIXED])
    assert [p.name for p in sweep.grid_points(grid, base)] == [
        "lamb-lr0.001-wd0-eps3.125e-08-constant-s0", "lamb-lr0.001-wd0-eps3.125e-08-constant-s1",
        "sgd-lr0.1-m0.9-constant-s0",
        "sgd-lr0.1-m0.9-constant-s1", "sgd-lr0.3-m0.9-constant-s0", "sgd-lr0.3-m0.9-constant-s1"]


@pytest.mark.parametrize("flag,listed", [
    (["--momentum", "0.5"], "--momenta"), (["--weight-decay", "0.1"], "--weight-decays"), (["--seed=3"], "--seeds"),
    (["--learning-rate", "0.1"], "--learning-rates"), (["--optimiser", "adam"], "--optimisers")])
def test_single_value_forms_of_swept_flags_are_refused(tmp_path, flag, listed):
    with pytest.raises(UsageError, match=f"{flag[0].split('=')[0]} is swept by sweep.py: give its values as {listed}"):
        sweep.parse_args(["--output-dir", str(tmp_path), *flag, *FIXED])


@pytest.mark.parametrize("seeds", ["0,1", "0"])
def test_a_stop_signal_during_a_runs_last_outer_loop_stops_the_sweep_before_its_next_run(tmp_path, seeds):
    """Between two runs, or after the last (whose last compiled outer loop finished the sweep): 128 + signal."""
    out = tmp_path / "sweep"
    # 3 steps: the compiled program of test_train.py's test_compiled_and_python_inner_loops_agree (not one more)
    argv = ["--optimisers", "lamb", "--learning-rates", "0.01", "--seeds", seeds, "--output-dir", str(out), *FIXED,
            "--inner-steps", "3", "--outer-steps", "1", "--inner-loop", "compiled"]
    process = subprocess.Popen([sys.executable, "sweep.py", *argv], env=device_env(), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "lamb-lr0.01-wd0-eps3.125e-08-constant-s0" / "metrics.jsonl"
    wait_for_records(first.parent, 0, process)  # the run has begun: the compiled outer loop is under way
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        "sweep.py: stopped by SIGTERM before run 2 of 2 (lamb-lr0.01-wd0-eps3.125e-08-constant-s1); re-running the "
        "same command goes on from there" if seeds == "0,1" else "sweep.py: stopped by SIGTERM during the last run's "
        "last outer loop, which completed the sweep: its runs are written (re-running the command writes the "
        "leaderboard)")
    assert read_metrics(first.parent)[2] is not None  # the first run finished its one outer loop
    assert not (out / "lamb-lr0.01-wd0-eps3.125e-08-constant-s1").exists()


def test_batch_sizes_must_divide_the_largest_and_epsilons_must_be_positive(tmp_path):
    with pytest.raises(UsageError, match="--batch-sizes: 96 does not divide the largest, 128"):
        sweep.grid_points(*sweep.parse_args(["--batch-sizes", "64,96,128", "--output-dir", str(tmp_path), *FIXED]))
    points = sweep.grid_points(*sweep.parse_args(["--optimisers", "adam", "--adam-rates", "0.01", "--batch-sizes",
                                                  "64,96,128",
                                                  "--batch-inner-steps", "same", "--output-dir", str(tmp_path),
                                                  *FIXED]))
    assert [(p.config.batch_size, p.config.inner_steps) for p in points] == [(64, 4), (96, 4), (128, 4)]
    with pytest.raises(UsageError, match="--epsilons must all be positive, got 0"):
        sweep.parse_args(["--optimisers", "adam", "--epsilons", "0", "--output-dir", str(tmp_path), *FIXED])
    crashed = {"optimiser": "adam", "batch_size": "", "learning_rate": 0.01, "target_step": ""}  # no header
    assert sweep.batch_summary([crashed]) == []


def test_the_per_optimiser_summary_takes_the_median_over_seeds():
    rows = [{"optimiser": "adam", "learning_rate": rate, "weight_decay": 0.0, "momentum": "", "epsilon": 1e-8,
             "best_validation_accuracy": accuracy}
            for rate, accuracies in [(0.01, [0.2, 0.9, 0.3]), (0.003, [0.5, 0.6, 0.55])] for accuracy in accuracies]
    (summary,) = sweep.optimiser_summary(rows)
    assert summary["best_setting"].startswith("lr 0.003") and summary["median_over_seeds"] == 0.55
    assert summary["best"] == 0.9 and abs(summary["spread"] - 0.1) < 1e-12 and summary["seeds"] == 3
    # Runs of another batch size at the same rate are another setting, not more seeds of this one.
    rows = [dict(r, batch_size=2400) for r in rows] + [
        dict(rows[0], batch_size=64, best_validation_accuracy=accuracy) for accuracy in (0.7, 0.8)]
    best, = sweep.optimiser_summary(rows)
    assert best["best_setting"] == "lr 0.01 wd 0 eps 1e-08 batch 64" and best["median_over_seeds"] == 0.75
    assert best["seeds"] == 2 and sweep.optimiser_summary(rows[:6])[0]["best_setting"] == "lr 0.003 wd 0 eps 1e-08"


def test_a_header_from_before_a_flag_existed_reads_as_the_run_it_was():
    """A metrics header without epsilon, batch size or initialiser (written before those flags) is the run it
    computed then, not a run at today's defaults: LAMB's default epsilon has changed since."""
    older = {"optimiser": "lamb", "learning_rate": 0.01, "seed": 0, "dataset": "synthetic", "inner_steps": 10}
    today = config.Config(dataset="synthetic")
    definition = sweep.saved_definition(older, today)
    assert (definition["epsilon"], definition["batch_size"], definition["initialiser"]) == (1e-6, None, "flax")
    assert sweep.saved_definition({**older, "epsilon": 1e-7}, today)["epsilon"] == 1e-7
    assert sweep.saved_definition({**older, "optimiser": "adam"}, today)["epsilon"] == 1e-8


def test_an_older_header_names_its_data_folder_by_the_path_given_now(tmp_path):
    """A header without a run definition names its data folder by the path it had then, which may be gone or
    lead elsewhere from where the sweep runs now: the folder is the one --data-dir names now (review)."""
    folder = make_folder(tmp_path / "images")
    older = {"optimiser": "adam", "learning_rate": 0.01, "seed": 0, "dataset": "folder", "data_dir": "../gone"}
    now = config.Config(optimiser="adam", learning_rate=0.01, dataset="folder", data_dir=str(folder))
    assert sweep.saved_definition(older, now)["data_dir"] == data.folder_identity(str(folder))
    checkpoint.refuse_other_run(sweep.saved_definition(older, now), now)  # the same run: no refusal


def test_a_run_name_means_the_same_run_whatever_the_default_epsilon():
    """Names carry epsilon where it is not optax's (a fixed reference), so a folder made when LAMB's default
    was optax's 1e-6 keeps its name and is found again by the same grid."""
    names = {epsilon: sweep.run_name(config.Config(optimiser="lamb", epsilon=epsilon)) for epsilon in (None, 1e-6)}
    assert names == {None: "lamb-lr0.01-wd0-eps3.125e-08-constant-s0", 1e-6: "lamb-lr0.01-wd0-constant-s0"}
    assert sweep.run_name(config.Config(optimiser="adam")) == "adam-lr0.001-wd0-constant-s0"


@pytest.mark.parametrize("argv,message", [
    (["--batch-sizes", "4,-4"], "--batch-sizes must all be positive, got -4"),
    (["--adam-rates", "0.01,0"], "--adam-rates must all be positive, got 0"),
    (["--learning-rates", "1e-3,x"], "--learning-rates '1e-3,x' is not a comma-separated list of numbers"),
    (["--momenta", "1"], "--momenta must all be in [0, 1), got 1"),
    (["--seeds", "0.5"], "--seeds '0.5' is not a comma-separated list of integers"),
    (["--optimisers", "adam", "--momenta", "0.5"], "--momenta applies to no run of this grid (--optimisers adam;"),
    (["--optimisers", "sgd", "--weight-decays", "0.1"], "--weight-decays applies to no run of this grid"),
    (["--optimisers", "sgd", "--epsilons", "1e-8"], "--epsilons applies to no run of this grid"),
    (["--optimisers", "lamb", "--sgd-rates", "0.1"], "--sgd-rates applies to no run of this grid"),
    (["--optimisers", "lamb", "--warmup-steps", "2"], "--warmup-steps needs a warmup schedule"),
    (["--optimisers", "lamb,rmsprop"], "unknown optimiser(s) ['rmsprop'] in --optimisers"),
    (["--optimisers", "lamb", "--momenta", "0.5"], "--momenta applies to no run of this grid"),
    (["--optimisers", "lamb", "--learning-rates", "5", "--lamb-rates", "0.01"],
     "--learning-rates applies to no run of this grid"),
    (["--optimisers", "adam", "--epsilons", "7e-3", "--adam-epsilons", "1e-8"], "--epsilons applies to no run"),
    (["--batch-inner-steps", "same"], "--batch-inner-steps applies to no run of this grid"),
    (["--optimisers", "adam", "--lamb-exclude-biases"], "--lamb-exclude-biases applies to no run of this grid"),
])
def test_bad_sweep_lists_end_with_one_line_naming_the_sweeps_own_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*argv, "--output-dir", str(tmp_path), *FIXED])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"sweep.py: error: {message}"), err


def test_a_value_given_twice_runs_once_and_counts_once(tmp_path, capsys):
    grid, base = sweep.parse_args(["--optimisers", "adam", "--adam-rates", "1e-3,0.001", "--seeds", "0,0",
                                   "--output-dir", str(tmp_path), *FIXED])
    assert grid["learning_rates"]["adam"] == [0.001] and grid["seeds"] == [0]
    assert len(sweep.grid_points(grid, base)) == 1
    err = capsys.readouterr().err
    assert "sweep.py: --adam-rates 1e-3,0.001 lists a value more than once; each runs once: 0.001" in err
    assert "sweep.py: --seeds 0,0 lists a value more than once; each runs once: 0" in err


def test_every_point_of_the_grid_is_checked_before_the_first_run_trains(tmp_path, capsys):
    """Everything train.py's programs refuse, for every point, before the first trains or makes its folder: the
    penalty block once came after the b64 run had trained (8 examples per device; the b32 run's 4 are too few)."""
    for sizes, more, message in [
            ("16,24,12", [], "--batch-sizes 12 does not split over the 8 devices"),
            ("64,4096", [], "--batch-sizes 4096 is above the 1,920 training examples"),
            ("64,32", ["--gradient-penalty", "0.1", "--penalty-block", "8"],
             "--penalty-block 8 is more than the 4 examples a device holds per step: a smaller block, or a larger "
             "--batch-sizes")]:
        out = tmp_path / sizes.replace(",", "-")
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["--optimisers", "adam", "--batch-sizes", sizes, "--batch-inner-steps", "same",
                        "--output-dir", str(out), *FIXED, *more])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith(f"sweep.py: error: {message}"), err
        assert not out.exists() or not list(out.iterdir())  # no run trained, nor made its folder


def test_a_sweep_starts_as_one_process_of_a_cluster(tmp_path):
    """Nothing may ask jax for a device or the process index before jax.distributed starts (a traceback on every
    host of a pod otherwise). The runs crashed earlier, so nothing trains: the process joins, skips them and
    writes the leaderboard."""
    argv = ["--optimisers", "sgd", "--sgd-rates", "0.1,0.3", "--output-dir", str(tmp_path), *FIXED]
    points = sweep.grid_points(*sweep.parse_args(argv))
    for point in points:
        sweep.record_crash(point.config, RuntimeError("earlier"))
    result = run_train([*argv, *one_process_cluster()], devices=2, check=False, script="sweep.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "joining 1 processes" in result.stdout and "ended earlier (diverged or crashed), skipped" in result.stdout
    assert (tmp_path / "leaderboard.md").read_text().count("| crashed |") == len(points) == 2


def test_default_values_written_otherwise_are_no_unused_lists_and_lamb_s_own_option_stays_lamb_s(tmp_path):
    for argv in (["--optimisers", "lamb", "--momenta", "0.90"], ["--optimisers", "sgd", "--weight-decays", "0.0"]):
        sweep.parse_args([*argv, "--output-dir", str(tmp_path), *FIXED])  # no refusal
    points = sweep.grid_points(*sweep.parse_args(["--optimisers", "lamb,adam", "--lamb-rates", "0.01", "--adam-rates",
                                                  "0.01", "--lamb-exclude-biases", "--output-dir", str(tmp_path),
                                                  *FIXED]))
    assert {p.config.optimiser: p.config.lamb_exclude_biases for p in points} == {"lamb": True, "adam": False}
    assert [p.name for p in points] == ["lamb-lr0.01-wd0-eps3.125e-08-xb-constant-s0", "adam-lr0.01-wd0-constant-s0"]


def test_run_names_carry_the_regularisers_and_settings_with_other_ones_are_not_seeds_of_one_another():
    c = config.Config(optimiser="lamb", ema=0.9, label_smoothing=0.1, lamb_exclude_biases=True, gradient_penalty=1.0,
                      penalty_block=8)
    assert sweep.options_name(c) == "-ema0.9-ls0.1-xb-gp1b8" and sweep.options_name(config.Config()) == ""
    rows = [{"optimiser": "lamb", "learning_rate": 0.01, "weight_decay": 0.0, "momentum": "", "epsilon": 1e-6,
             "options": options, "best_validation_accuracy": accuracy}
            for options, accuracy in [("none", 0.5), ("none", 0.52), ("ema0.9", 0.6)]]
    (summary,) = sweep.optimiser_summary(rows)
    assert summary["best_setting"] == "lr 0.01 wd 0 eps 1e-06 ema0.9" and summary["seeds"] == 1


def test_a_finished_run_whose_finite_loss_blew_up_before_the_rule_is_diverged_on_the_leaderboard(tmp_path):
    """A run made before train.py stopped on a finite blown-up loss ended with a summary and no diverged line:
    its status comes from its records by the same rule (above 10 x ln(10) here, its header naming no classes)."""
    points = []
    for name, loss in [("blown", 3e12), ("spike", 20.0)]:
        c = config.Config(optimiser="lamb", dataset="synthetic", output_dir=str(tmp_path / name))
        os.makedirs(c.output_dir)
        records = [{"outer": 1, "step": 4, "loss": 2.0, "validation_accuracy": 0.3},
                   {"outer": 2, "step": 8, "loss": loss, "validation_accuracy": 0.1}]
        lines = [{"config": {}, "examples_per_step": 100}, *records, {"summary": {"target": None}}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        points.append(sweep.Point(name, c))
    assert {r["run"]: r["status"] for r in sweep.leaderboard_rows(points)} == {"blown": "diverged", "spike": "ok"}


def test_leaderboard_cells_give_rates_and_coefficients_as_given():
    assert sweep.cell("epsilon", 3.125e-08) == "3.125e-08" and sweep.cell("weight_decay", 1e-05) == "1e-05"
    assert sweep.cell("best_validation_accuracy", 0.58812) == "0.5881" and sweep.cell("final_loss", 1.23456) == "1.2346"
    assert sweep.cell("target_seconds", 47.2212) == "47.22" and sweep.cell("seed", 2) == "2"
