import json
import os

import pytest

import config
import sweep
from errors import UsageError

FIXED = ["--dataset", "synthetic", "--image-size", "16", "--channels", "8,16", "--dense", "16",
         "--synthetic-examples", "300", "--inner-steps", "4", "--outer-steps", "3", "--target-accuracy", "0.3"]


def test_muon_and_lbfgs_points_take_their_own_lists_and_names(tmp_path):
    """Muon takes the weight decays, L-BFGS the memories (and, by default, optax's one rate 1); each value is a
    run of its own name; a memories list without lbfgs, and the default optimisers, are the blog's three."""
    points = sweep.grid_points(*sweep.parse_args(["--optimisers", "muon,lbfgs", "--muon-rates", "0.02",
                                                  "--weight-decays", "0,0.1", "--lbfgs-memories", "3,10",
                                                  "--output-dir", str(tmp_path), *FIXED]))
    assert [(p.name, p.config.learning_rate, p.config.weight_decay, p.config.lbfgs_memory) for p in points] == [
        ("muon-lr0.02-wd0-constant-s0", 0.02, 0.0, 10), ("muon-lr0.02-wd0.1-constant-s0", 0.02, 0.1, 10),
        ("lbfgs-lr1-mem3-constant-s0", 1.0, 0.0, 3), ("lbfgs-lr1-mem10-constant-s0", 1.0, 0.0, 10)]
    with pytest.raises(UsageError, match="--lbfgs-memories applies to no run of this grid"):
        sweep.parse_args(["--optimisers", "adam", "--lbfgs-memories", "3", "--output-dir", str(tmp_path), *FIXED])
    assert sweep.parse_args(["--output-dir", str(tmp_path), *FIXED])[0]["optimisers"] == ["lamb", "adam", "sgd"]


def test_the_leaderboard_keeps_lbfgs_memories_apart_and_gives_muon_its_weight_decay(tmp_path):
    points = []
    for name, optimiser, extra in [("mem3", "lbfgs", {"lbfgs_memory": 3}), ("muon", "muon", {"weight_decay": 0.1})]:
        c = config.Config(optimiser=optimiser, dataset="synthetic", output_dir=str(tmp_path / name), **extra)
        os.makedirs(c.output_dir)
        lines = [{"config": {}, "examples_per_step": 100},
                 {"outer": 1, "step": 4, "loss": 2.0, "validation_accuracy": 0.3}, {"summary": {"target": None}}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        points.append(sweep.Point(name, c))
    rows = {r["run"]: r for r in sweep.leaderboard_rows(points)}
    sweep.write_plots(str(tmp_path), list(rows.values()))  # a colour for each optimiser
    assert (rows["mem3"]["lbfgs_memory"], rows["mem3"]["weight_decay"]) == (3, "")
    assert (rows["muon"]["lbfgs_memory"], rows["muon"]["weight_decay"]) == ("", 0.1)
    rows = [{"optimiser": "lbfgs", "learning_rate": 1.0, "weight_decay": "", "momentum": "", "epsilon": "",
             "lbfgs_memory": memory, "best_validation_accuracy": accuracy}
            for memory, accuracy in [(3, 0.5), (3, 0.52), (10, 0.6)]]
    (summary,) = sweep.optimiser_summary(rows)
    assert summary["best_setting"] == "lr 1 memory 10" and summary["seeds"] == 1
