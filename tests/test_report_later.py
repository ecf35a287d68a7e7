import json

import report
from test_report import write_run


def with_records(folder, name, config=None, records=None):
    """A written run's metrics file with config entries and per-outer-loop record fields added."""
    path = folder / name / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["config"].update(config or {})
    for line, extra in zip(lines[1:], records or []):
        line.update(extra)
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_the_later_optimisers_block_sets_muon_and_lbfgs_beside_each_blog_optimiser_s_best(tmp_path):
    """Seconds per step leave the first outer loop (its compile) out; L-BFGS's evaluations per step are its
    recorded ones over its steps (every other optimiser makes one); each blog optimiser's best setting only."""
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-good", "lamb", 0.01, 0, [0.3, 0.7])
    write_run(results / report.SWEEP, "lamb-worse", "lamb", 0.03, 0, [0.3, 0.4])
    write_run(results / report.SWEEP, "adam", "adam", 0.003, 0, [0.2, 0.5])
    for seed, best in enumerate([0.6, 0.64]):
        write_run(results / report.LATER[0], f"muon-s{seed}", "muon", 0.02, seed, [0.4, best, 0.5])
        with_records(results / report.LATER[0], f"muon-s{seed}", {"epsilon": None},
                     [{"inner_seconds": s} for s in (9.0, 2.0, 3.0)])
    write_run(results / report.LATER[1], "lbfgs", "lbfgs", 1.0, 0, [0.3, 0.55, 0.52])
    with_records(results / report.LATER[1], "lbfgs", {"epsilon": None, "lbfgs_memory": 5},
                 [{"inner_seconds": s, "evaluations": e} for s, e in ((9.0, 40), (5.0, 30), (7.0, 20))])
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    block = text[text.index("<!-- report:later-optimisers -->"):text.index("<!-- /report:later-optimisers -->")]
    assert "| lamb lr 0.01 (section 1's best) | 0.7000 | 0.7000 - 0.7000 | 1 | 20 | 0.10 | 1 |" in block
    assert "lamb lr 0.03" not in block
    assert "| muon lr 0.02 | 0.6200 | 0.6000 - 0.6400 | 2 | 20 | 0.25 | 1 |" in block  # (0.2 + 0.3) / 2 s a step
    assert "| lbfgs lr 1 memory 5 | 0.5500 | 0.5500 - 0.5500 | 1 | 20 | 0.60 | 3.00 |" in block  # 90 / 30 steps
    assert "--optimisers lbfgs --lbfgs-rates 1 --lbfgs-memories 5 --seeds 0" in block
    assert "--optimisers muon --muon-rates 0.02 --seeds 0,1" in block
    assert (results / report.LATER[0] / "later_optimisers.png").read_bytes()[:4] == b"\x89PNG"
