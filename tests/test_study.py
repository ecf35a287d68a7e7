"""The full-scale study's machinery at toy scale: the plan's order, the budget, the pack, the variant."""
import json
import os

import pytest

import study
from helpers import SMALL, one_process_cluster, read_metrics, run_train
from metrics import read_pack

FIXED = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "4", "--outer-steps", "3"]


def test_a_study_runs_its_plan_in_order_packs_every_line_and_skips_what_the_budget_cannot_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "PLAN", [{"optimiser": "lamb", "learning_rate": 1e-2},
                                        {"optimiser": "sgd", "learning_rate": 0.1}, {"winner_seeds": [1]}])
    pack = tmp_path / "study.jsonl"
    argv = ["--pack", str(pack), "--output-dir", str(tmp_path / "runs"), *FIXED]
    outcome = study.run_study(*study.parse_args([*argv, "--budget-seconds", "1e9"]))
    first, second = "lamb-lr0.01-wd0-eps3.125e-08-warmup_cosine-s0", "sgd-lr0.1-m0.9-warmup_cosine-s0"
    assert outcome["ran"][:2] == [first, second] and len(outcome["ran"]) == 3 and not outcome["skipped"]
    best = max((first, second), key=lambda n: max(r["validation_accuracy"]
                                                  for r in read_metrics(tmp_path / "runs" / n)[1]))
    assert outcome["ran"][2] == best[:-1] + "1"  # the winner, again with seed 1
    packed = read_pack(str(pack))
    assert list(packed) == outcome["ran"]
    for name, lines in packed.items():  # the pack holds exactly what each run's own metrics.jsonl holds
        with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
            assert lines == [json.loads(line) for line in f]
        assert lines[0]["config"]["schedule"] == "warmup_cosine"
        assert lines[0]["config"]["warmup_steps"] == 1  # a tenth of the whole run's 12 steps
    # Run again with no budget: the finished runs are not redone, the new ones do not fit; the pack, and a new
    # one, hold every run whole (a repeated device call: each pack stands alone).
    outcome = study.run_study(*study.parse_args([*argv, "--budget-seconds", "1"]))
    assert outcome["ran"] == [] and outcome["skipped"] == []
    assert read_pack(str(pack)) == packed
    again = ["--pack", str(tmp_path / "again.jsonl"), *argv[2:], "--budget-seconds", "1"]
    assert study.run_study(*study.parse_args(again))["ran"] == []
    assert read_pack(str(tmp_path / "again.jsonl")) == packed


def test_a_resumed_run_mirrors_its_whole_file_header_first():
    """What a pack receives when a run resumes: every line its metrics.jsonl keeps, then the resume line."""
    import metrics
    lines = []
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mirror-{os.getpid()}.jsonl")
    header = {"config": {"optimiser": "lamb", "outer_steps": 3}}
    with open(path, "w") as f:
        for line in [header, {"outer": 1, "validation_accuracy": 0.5}, {"outer": 2, "validation_accuracy": 0.6}]:
            f.write(json.dumps(line) + "\n")
    metrics.MetricsLog(path, header, 1, lines.append).file.close()
    os.remove(path)
    assert lines[:2] == [header, {"outer": 1, "validation_accuracy": 0.5}]
    assert lines[2]["resumed_after_outer"] == 1 and len(lines) == 3


@pytest.mark.parametrize("argv,message", [
    (["--output-dir", "runs"], "the following arguments are required: --pack (see study.py --help)"),
    (["--pack", "p.jsonl", "--output-dir", "r", "--budget-seconds", "abc"],
     "argument --budget-seconds: invalid float value: 'abc' (see study.py --help)"),
    (["--pack", "p.jsonl", "--output-dir", "r", "--budget-seconds", "0"], "--budget-seconds must be positive, got 0.0"),
    (["--pack", "{tmp}/no/such/p.jsonl", "--output-dir", "r"], "--pack {tmp}/no/such/p.jsonl: its folder {tmp}/no/such "
                                                             "does not exist"),
    (["--pack", "p.jsonl", "--output-dir", "r", "--variant-from", "{tmp}/none.json"],
     "--variant-from {tmp}/none.json is not a bench.py --json file: [Errno 2] No such file or directory"),
    (["--pack", "p.jsonl", "--output-dir", "r", "--dense", "0"], "--dense must be positive, got 0"),
])
def test_bad_study_inputs_end_with_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        study.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("study.py: error: " + message.format(tmp=tmp_path)), err[0]


def test_nothing_starts_that_the_budget_cannot_fit(tmp_path):
    outcome = study.run_study(*study.parse_args(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path),
                                                 "--budget-seconds", "30", "--seconds-per-outer", "10", *FIXED]))
    assert outcome["ran"] == [] and len(outcome["skipped"]) == len(study.PLAN) - 1  # the winner has none to copy
    assert not any(os.path.isdir(tmp_path / name) for name in outcome["skipped"])


def test_the_fastest_correct_variant_of_a_bench_file_is_taken(tmp_path):
    rows = [{"name": "a", "conv": "xla", "remat_gelu": False, "microbatch": 100, "dtype": "bfloat16",
             "images_per_second": 1e6, "logits_relative_error": 0.005},
            {"name": "b", "conv": "space_to_depth", "remat_gelu": True, "microbatch": 50, "dtype": "bfloat16",
             "images_per_second": 2e6, "logits_relative_error": 0.006},
            {"name": "wrong", "conv": "patches", "remat_gelu": False, "microbatch": 50, "dtype": "bfloat16",
             "images_per_second": 9e6, "logits_relative_error": 0.5},
            {"name": "f32", "conv": "patches", "remat_gelu": False, "microbatch": 50, "dtype": "float32",
             "images_per_second": 8e6, "logits_relative_error": 1e-7},
            {"name": "broken", "variant": "broken", "error": "out of memory"}]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows}))
    assert study.fastest_variant(str(tmp_path / "bench.json"), "bfloat16") == (
        {"conv": "space_to_depth", "remat_gelu": True, "microbatch": 50},
        f"fastest variant in {tmp_path / 'bench.json'}: b (2,000,000 img/s)")
    with pytest.raises(study.UsageError, match="no correct float16 variant"):
        study.fastest_variant(str(tmp_path / "bench.json"), "float16")


def test_a_study_with_a_variant_starts_as_one_process_of_a_cluster(tmp_path):
    """The variant was logged while the flags were parsed, which asked jax for the process index before
    jax.distributed started: a traceback wherever it starts (every Cloud TPU VM). No run fits the budget, so
    nothing trains; the process joins, says the variant, and ends the study."""
    rows = [{"name": "fast", "conv": "xla", "remat_gelu": False, "microbatch": 8, "dtype": "float32",
             "images_per_second": 1e6, "logits_relative_error": 1e-7}]
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows}))
    result = run_train(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "runs"), "--variant-from",
                        str(tmp_path / "bench.json"), "--budget-seconds", "1", *FIXED, *one_process_cluster()],
                       devices=2, check=False, script="study.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "joining 1 processes" in result.stdout and f"fastest variant in {tmp_path / 'bench.json'}: fast" in \
        result.stdout and "study: ran 0, skipped" in result.stdout
    assert read_pack(str(tmp_path / "p.jsonl")) == {}  # only the study's own line: no run


def test_the_plan_runs_lamb_at_the_default_epsilon_and_again_at_optaxs():
    import config
    base = study.parse_args(["--pack", "p.jsonl", "--output-dir", "runs", *FIXED])[1]
    lambs = [study.planned(base, entry) for entry in study.PLAN if entry.get("optimiser") == "lamb"]
    assert lambs[0].epsilon == config.DEFAULT_EPSILONS["lamb"] == 1e-6 / 32
    assert [(c.learning_rate, c.epsilon) for c in lambs].count((lambs[0].learning_rate, 1e-6)) == 1
    assert {c.schedule for c in lambs} == {"warmup_cosine"}


def test_the_plan_ends_with_the_recommended_average_after_the_blog_s_own_runs():
    import config
    base = study.parse_args(["--pack", "p.jsonl", "--output-dir", "runs", *FIXED])[1]
    last = study.planned(base, study.PLAN[-1])
    assert "winner_seeds" in study.PLAN[-2]  # the runs that answer the blog's question come first
    assert not any(study.planned(base, e).ema for e in study.PLAN[:-1] if "optimiser" in e)
    assert (last.optimiser, last.learning_rate, last.ema, last.schedule) == ("lamb", 1e-2, 0.99, "warmup_cosine")
    assert round(1 / (1 - last.ema)) == config.Config().inner_steps  # the average spans one outer loop


@pytest.mark.parametrize("flag", ["--seed", "--learning-rate", "--schedule", "--weight-decay", "--optimiser",
                                  "--ema"])
def test_what_the_plan_sets_for_each_run_is_refused_on_the_command_line(tmp_path, capsys, flag):
    value = {"--schedule": "warmup_linear", "--optimiser": "adam"}.get(flag, "0.5" if flag != "--seed" else "5")
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path), flag, value, *FIXED])
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == (
        f"study.py: error: {flag} is set by the study's plan for each run (study.PLAN): leave it out")


def test_lamb_s_own_option_goes_to_the_plan_s_lamb_runs_only_and_every_run_is_checked_first(tmp_path, monkeypatch):
    base = study.parse_args(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path),
                             "--lamb-exclude-biases", *FIXED])[1]
    assert {(c.optimiser, c.lamb_exclude_biases) for c in (study.planned(base, e) for e in study.PLAN
                                                           if "optimiser" in e)} == {
        ("lamb", True), ("adam", False), ("sgd", False), ("muon", False), ("lbfgs", False)}
    monkeypatch.setattr(study, "PLAN", [{"optimiser": "lamb", "learning_rate": 1e-2},
                                        {"optimiser": "adam", "learning_rate": -1.0}])  # the second cannot run
    with pytest.raises(study.UsageError, match="--learning-rate must be positive"):
        study.run_study(*study.parse_args(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path),
                                           *FIXED]))
    assert not (tmp_path / "lamb-lr0.01-wd0-eps3.125e-08-warmup_cosine-s0").exists()  # refused before it trained


def test_the_plan_runs_muon_and_lbfgs_after_the_blogs_three_and_lbfgs_only_where_the_flags_allow_it():
    import sweep
    base = study.parse_args(["--pack", "p.jsonl", "--output-dir", "runs", *FIXED])[1]
    runs = [study.planned(base, entry) for entry in study.PLAN[:5]]
    assert [c.optimiser for c in runs] == ["lamb", "adam", "sgd", "muon", "lbfgs"]
    assert (runs[4].schedule, runs[4].warmup_steps, runs[4].learning_rate) == ("constant", 0, 1.0)  # its own step
    assert runs[3].schedule == "warmup_cosine" and runs[3].learning_rate == study.DEFAULT_LEARNING_RATES["muon"]
    for entry in study.PLAN:  # every run of the plan passes train.py's checks
        if "optimiser" in entry:
            sweep.at_home(study.planned(base, entry), "runs")
    assert not any(study.not_for(base, entry) for entry in study.PLAN)
    drawn = study.parse_args(["--pack", "p.jsonl", "--output-dir", "runs", "--batch-size", "64", *FIXED])[1]
    assert [entry.get("optimiser") for entry in study.PLAN if study.not_for(drawn, entry)] == ["lbfgs"]


def test_what_the_runs_programs_refuse_is_refused_before_the_first_run_makes_its_folder(tmp_path):
    with pytest.raises(study.UsageError, match="--penalty-block 16 is more than the 8 examples a device holds"):
        study.run_study(*study.parse_args(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "runs"),
                                           "--budget-seconds", "1e9", "--batch-size", "64", "--gradient-penalty", "0.1",
                                           "--penalty-block", "16", *FIXED]))
    assert not (tmp_path / "runs").exists()


def test_a_run_that_crashes_is_packed_whole_header_first(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(study, "PLAN", [{"optimiser": "sgd", "learning_rate": 0.1}])

    def crash(config, shared, stop):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    monkeypatch.setattr(train, "run", crash)
    study.run_study(*study.parse_args(["--pack", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "runs"),
                                       "--budget-seconds", "1e9", *FIXED]))
    (lines,) = read_pack(str(tmp_path / "p.jsonl")).values()
    assert "config" in lines[0] and lines[-1] == {"crashed": True, "error": "RuntimeError: RESOURCE_EXHAUSTED: out of "
                                                                             "memory"}
