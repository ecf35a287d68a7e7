"""The full-scale study's machinery at toy scale: the plan's order, the budget, the pack, the variant."""
import json
import os

import pytest

import study
from helpers import SMALL, read_metrics
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
    # Run again with no budget: the finished runs are not redone, the new ones do not fit.
    outcome = study.run_study(*study.parse_args([*argv, "--budget-seconds", "0"]))
    assert outcome["ran"] == [] and outcome["skipped"] == []
    assert read_pack(str(pack)) == packed


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
    assert study.fastest_variant(str(tmp_path / "bench.json"), "bfloat16") == {
        "conv": "space_to_depth", "remat_gelu": True, "microbatch": 50}
    with pytest.raises(study.UsageError, match="no correct float16 variant"):
        study.fastest_variant(str(tmp_path / "bench.json"), "float16")


def test_the_plan_runs_lamb_at_the_default_epsilon_and_again_at_optaxs():
    import config
    base = study.parse_args(["--pack", "p.jsonl", "--output-dir", "runs", *FIXED])[1]
    lambs = [study.planned(base, entry) for entry in study.PLAN if entry.get("optimiser") == "lamb"]
    assert lambs[0].epsilon == config.DEFAULT_EPSILONS["lamb"] == 1e-6 / 32
    assert [(c.learning_rate, c.epsilon) for c in lambs].count((lambs[0].learning_rate, 1e-6)) == 1
    assert {c.schedule for c in lambs} == {"warmup_cosine"}
