import json
import os

import numpy as np
import pytest

import critical_batch
import report


def write_run(folder, name, optimiser, rate, seed, accuracies, schedule="constant", summary=True):
    os.makedirs(folder / name)
    config = {"optimiser": optimiser, "learning_rate": rate, "weight_decay": 0.0, "momentum": 0.9, "seed": seed,
              "schedule": schedule, "warmup_steps": 2 if schedule != "constant" else 0, "inner_steps": 10,
              "outer_steps": len(accuracies), "train_examples": 256, "dtype": "float32", "dataset": "folder",
              "data_dir": "EuroSAT_RGB", "target_accuracy": 0.5}
    header = {"config": config, "devices": 2, "backend": "cpu", "train_examples": 256, "validation_examples": 2700,
              "examples_per_step": 2048, "jax": "0"}
    records = [{"outer": i + 1, "step": 10 * (i + 1), "loss": 2.0 - a, "validation_accuracy": a,
                "inner_seconds": 1.0, "images_per_second": 2048.0} for i, a in enumerate(accuracies)]
    lines = [header, *records] + ([{"summary": {"train_seconds": 60.0 * len(accuracies), "test_accuracy": 0.5,
                                                "best": {"validation_accuracy": max(accuracies),
                                                         "step": 10 * (accuracies.index(max(accuracies)) + 1)}}}]
                                  if summary else [])
    (folder / name / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_report_ranks_optimisers_by_median_over_seeds_and_counts_steps_to_thresholds(tmp_path):
    sweep = tmp_path / "results" / report.SWEEP
    for seed, (lamb, adam) in enumerate([(0.55, 0.60), (0.52, 0.40), (0.58, 0.45)]):
        write_run(sweep, f"lamb-s{seed}", "lamb", 0.01, seed, [0.3, lamb, lamb - 0.01])
        write_run(sweep, f"adam-s{seed}", "adam", 0.003, seed, [0.2, 0.3, adam])
        write_run(sweep, f"sgd-s{seed}", "sgd", 0.1, seed, [0.1, 0.2, 0.3])
    tuning = tmp_path / "results" / report.TUNING
    for seed in range(3):
        write_run(tuning, f"cos-s{seed}", "lamb", 0.02, seed, [0.4, 0.6 + seed / 100], schedule="warmup_cosine")
    write_run(tmp_path / "results" / report.FINAL, "final", "lamb", 0.02, 0, [0.4, 0.62], schedule="warmup_cosine")
    report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    # lamb's median over seeds is 0.55, adam's 0.45 (though adam has the best single run, 0.60)
    only = "(the only rate tried: not bracketed)"
    assert f"| 1 | lamb | 0.01 | lamb lr 0.01 {only} | 0.5500 | 0.5200 - 0.5800 | 20 | not reached | not reached |" \
        in text
    assert f"| 2 | adam | 0.003 | adam lr 0.003 {only} | 0.4500 | 0.4000 - 0.6000 | 1/3 seeds | not reached |" in text
    assert "| 3 | sgd |" in text
    assert "| 1 | adam-s0 | 0.6000 | 30 |" in text  # the single-run table
    assert "LAMB first, as in the blog" in text and "SGD with momentum has 3 of the 9 best" in text
    assert "lamb lr 0.02 warmup_cosine (2 warmup steps) | 0.6100 | 0.6000 - 0.6200 | 20 |" in text
    assert ("median 0.6100 against 0.5500 for the constant rate (+0.0600; the constant rate's spread over seeds is "
            "0.0600)") in text
    assert "a gain about the size of the seed-to-seed spread" in text
    assert "**test accuracy of those params 0.5000**" in text
    assert "Full scale" not in text  # no such runs here


def test_report_replaces_only_its_marked_blocks_and_keeps_what_people_wrote(tmp_path):
    sweep = tmp_path / "results" / report.SWEEP
    for seed in range(2):
        write_run(sweep, f"lamb-s{seed}", "lamb", 0.01, seed, [0.3, 0.5 + seed / 10])
    out = tmp_path / "RESULTS.md"
    out.write_text("# Ours\n\nA reading written by hand.\n\n<!-- report:sweep -->\nstale table\n<!-- /report:sweep -->"
                   "\n\nMore words.\n\n<!-- report:findings -->\n<!-- /report:findings -->\n")
    report.main(["--results", str(tmp_path / "results"), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Ours\n\nA reading written by hand.\n\n<!-- report:sweep -->\nScale: 256 training images")
    assert "stale table" not in text and "\n\nMore words.\n\n<!-- report:findings -->\n- Ranking" in text
    assert "| 1 | lamb | 0.01 | lamb lr 0.01 (the only rate tried: not bracketed) | 0.5500 | 0.5000 - 0.6000 |" in text
    report.main(["--results", str(tmp_path / "results"), "--out", str(out)])
    assert out.read_text() == text  # the same results give the same file
    out.write_text(text + "<!-- report:nonsense -->\n<!-- /report:nonsense -->\n")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(tmp_path / "results"), "--out", str(out)])
    assert exit_info.value.code == 2
    assert out.read_text() == text + "<!-- report:nonsense -->\n<!-- /report:nonsense -->\n"  # refused, not emptied


def test_a_study_pack_gives_every_image_accuracy_with_an_interval_and_the_blogs_host_zero_figure(tmp_path):
    from metrics import Pack, pack_bits
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    (results / report.STUDY).mkdir()
    pack = Pack(str(results / report.STUDY / "h100.study.jsonl"))
    right = np.zeros(2700, bool)
    right[:672] = True  # host 0's images all right...
    right[1000:1000 + 2160 - 672] = True  # ...and 2,160 of 2,700 in all: 0.80
    elsewhere = np.zeros(2700, bool)
    elsewhere[672:672 + 1800] = True  # 1,800 right (0.6667), none of them host 0's
    for rate, correct in [(0.01, right), (0.02, elsewhere)]:
        write = pack.writer(f"lamb-lr{rate:g}")
        write({"config": {"optimiser": "lamb", "learning_rate": rate, "inner_steps": 100, "dtype": "bfloat16",
                          "schedule": "warmup_cosine", "warmup_steps": 130, "weight_decay": 0.0},
               "examples_per_step": 172800, "validation_examples": 2700, "conv": "xla", "devices": 1,
               "backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "jax": "0.11.2"})
        later = correct if rate == 0.01 else np.zeros(2700, bool)  # 0.02's last outer loop is not its best
        for outer, bits in [(1, np.zeros(2700, bool)), (2, correct), (3, later)][:2 + (rate == 0.02)]:
            write({"outer": outer, "step": 100 * outer, "loss": 1.0, "validation_accuracy": bits.mean(),
                   "images_per_second": 2e6, "train_seconds": 10.0 * outer, "validation_correct": pack_bits(bits)})
    pack.writer("lamb-lr0.02")({"summary": {"train_seconds": 20.0}})
    pack.writer("lamb-lr0.04")({"config": {"optimiser": "lamb", "learning_rate": 0.04, "inner_steps": 100},
                                "validation_examples": 2700})  # cut off in its first outer loop
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "1 x NVIDIA H100 80GB HBM3 (jax 0.11.2)" in text
    assert "the 672 validation images the original's host 0 scored (TFDS's order of train[80%:90%])" in text
    # 2,160 of 2,700 right: 0.8000, Wilson 95% interval 0.784 - 0.815; host 0's 672 images all right: 1.00. Here the
    # best outer loop is the last, so the interval of a choice made without looking is the same.
    assert "| lamb-lr0.01 | 2 | 0.8000 (0.784 - 0.815) | 0.8000 (0.784 - 0.815) | 1.00 | not reached | not reached " \
           "| 2,000,000 | cut off |" in text
    assert "| lamb-lr0.02 | 3 | 0.6667 (0.649 - 0.684) | 0.0000 (0.000 - 0.001) | 0.00 | not reached | not reached " \
           "| 2,000,000 | ok |" in text  # the last outer loop's interval is its own, not the best's
    assert "| lamb-lr0.04 | 0 |  |  |  |  |  |  | cut off |" in text
    assert "| lamb | 0.01, 0.02, 0.04 | lamb-lr0.01 (lowest tried: not bracketed) | 0.8000 |" in text
    assert report.host_zero_count(2700) == 672 and report.host_zero_count(30) == 0  # too few to say: no figure


def test_a_pack_is_read_as_each_run_s_own_metrics_file_would_be_after_a_resume(tmp_path):
    from metrics import Pack, read_pack
    pack = Pack(str(tmp_path / "p.study.jsonl"))
    write = pack.writer("run")
    header = {"config": {"outer_steps": 3}}
    for line in [header, {"outer": 1, "loss": 3.0}, {"outer": 2, "loss": 2.0}, {"outer": 3, "loss": 1.0},
                 {"summary": {"x": 1}}]:
        write(line)
    resumed = {"resumed_after_outer": 2, "config": {"outer_steps": 4}}
    for line in [resumed, {"outer": 3, "loss": 0.9}, {"outer": 4, "loss": 0.8}]:
        write(line)
    pack.writer(None)({"study": {}})
    assert read_pack(str(tmp_path / "p.study.jsonl")) == {"run": [
        header, {"outer": 1, "loss": 3.0}, {"outer": 2, "loss": 2.0}, resumed, {"outer": 3, "loss": 0.9},
        {"outer": 4, "loss": 0.8}]}


def test_the_epsilon_and_batch_size_blocks(tmp_path):
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    for rate in (0.003, 0.01):
        for epsilon, base in ((1e-6, 0.50), (3.125e-8, 0.53)):
            for seed in (0, 1):
                name = f"lamb-{rate}-{epsilon}-{seed}"
                write_run(results / report.EPSILON, name, "lamb", rate, seed, [0.3, base + rate + seed / 100])
                patch_config(results / report.EPSILON / name, epsilon=epsilon)
    # Steps to 0.5 per (rate, batch, seed): the best rate per batch is the one with the fewest median steps.
    for rate, batch, seed, curve in [(0.01, 64, 0, [0.2, 0.4, 0.5]), (0.01, 64, 1, [0.2, 0.5, 0.5]),
                                     (0.03, 64, 0, [0.5, 0.6, 0.6]), (0.03, 64, 1, [0.2, 0.2, 0.2]),
                                     (0.01, 256, 0, [0.5, 0.5, 0.5]), (0.01, 256, 1, [0.5, 0.5, 0.5])]:
        name = f"adam-{rate}-b{batch}-s{seed}"
        write_run(results / report.BATCH, name, "adam", rate, seed, curve)
        patch_config(results / report.BATCH / name, batch_size=batch, inner_steps=10 * 256 // batch)
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| lamb | 0.01 | 3.125e-08 | 0.5450 | 0.5400 - 0.5500 | 2 |" in text
    assert "| lamb | 0.003 | 1e-06 | 0.5080 | 0.5030 - 0.5130 | 2 |" in text
    assert "Best per optimiser (by median): lamb lr 0.01 epsilon 3.125e-08 (0.5450)." in text
    # Batch 64 runs 40 steps per outer loop: rate 0.01 reaches 0.5 at steps 120 and 80 (median 100, 6,400
    # images), 0.03 at 40 and never (median never). Batch 256: 10 steps per outer loop, at once.
    assert "| adam | 64 | 0.01 | 100 | 6,400 | 2/2 |" in text and "| adam | 256 | 0.01 | 10 | 2,560 | 2/2 |" in text
    assert "--batch-sizes 64,256" in text and "--inner-steps 10 " in text


def patch_config(folder, **changes):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["config"].update(changes)
    steps = header["config"]["inner_steps"]
    records = [json.loads(line) for line in lines[1:]]
    for r in records:
        if "outer" in r:
            r["step"] = r["outer"] * steps
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")


def test_commands_name_the_epsilons_their_runs_used_where_they_are_not_todays_defaults(tmp_path, monkeypatch):
    results = tmp_path / "results"
    for seed in (0, 1):  # headers from before --epsilon existed: those runs used optax's defaults
        write_run(results / report.SWEEP, f"lamb-s{seed}", "lamb", 0.01, seed, [0.3, 0.5])
        write_run(results / report.SWEEP, f"adam-s{seed}", "adam", 0.003, seed, [0.3, 0.5])
    write_run(results / report.FINAL, "final", "lamb", 0.01, 0, [0.3, 0.5])
    patch_config(results / report.FINAL / "final", epsilon=3.125e-8)

    def commands(defaults):
        monkeypatch.setattr(report, "DEFAULT_EPSILONS", defaults)
        report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
        return [line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if " python " in line]

    sweep, final = commands({"lamb": 1e-6, "adam": 1e-8, "sgd": None})
    assert "epsilon" not in sweep and "--epsilon 3.125e-08 " in final
    sweep, final = commands({"lamb": 3.125e-8, "adam": 1e-8, "sgd": None})
    assert "--lamb-epsilons 1e-06 " in sweep and "adam-epsilons" not in sweep and "epsilon" not in final


def test_settings_that_differ_only_in_epsilon_stay_apart_and_a_train_command_never_lists_two(tmp_path):
    results = tmp_path / "results"
    for name, epsilon, accuracies in (("lamb_a", 1e-6, [0.3, 0.5]), ("lamb_b", 3.125e-8, [0.4, 0.6])):
        write_run(results / report.FULL_SCALE, name, "lamb", 0.01, 0, accuracies)
        patch_config(results / report.FULL_SCALE / name, epsilon=epsilon)
    for seed, epsilon in ((0, 1e-6), (1, 3.125e-8)):
        write_run(results / report.SWEEP, f"lamb-s{seed}", "lamb", 0.01, seed, [0.3, 0.5 + seed / 10])
        patch_config(results / report.SWEEP / f"lamb-s{seed}", epsilon=epsilon)
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "--epsilon EPSILON " in text and "--epsilon 1e-06" not in text  # the rows say which
    assert "| lamb lr 0.01 eps 3.125e-08 | 2 | 0.6000 |" in text and "| lamb lr 0.01 | 2 | 0.5000 |" in text
    assert "--lamb-epsilons 1e-06,3.125e-08 " in text
    assert "| lamb lr 0.01 eps 3.125e-08 | 0.6000 | 0.6000 - 0.6000 | 1 |" in text  # one seed each, not two


def test_the_blog_style_figure_says_which_images_it_is_on_for_each_data_source():
    assert "host 0 scored (TFDS's order" in report.host_zero_words({"dataset": "tfds"}, 672)
    folder = report.host_zero_words({"dataset": "folder"}, 672)
    assert "first 672 validation images in the folder source's order" in folder and "not the same ones" in folder
    assert report.host_zero_words({"dataset": "synthetic"}, 8) == "the first 8 validation images (synthetic data)"


def study_header(rate):
    return {"config": {"optimiser": "lamb", "learning_rate": rate, "inner_steps": 100, "dtype": "bfloat16",
                       "dataset": "folder"}, "examples_per_step": 172800, "validation_examples": 2700, "conv": "xla",
            "devices": 1, "backend": "gpu", "device_kind": "NVIDIA H200", "jax": "0.11.2"}


def test_a_study_run_again_after_a_cut_is_read_once_from_the_pack_that_holds_it_whole(tmp_path):
    """Call 2 repeated on a warm machine: the first pack holds a run cut off, the second the same run whole
    (header first, resumed) and one that only crashed: each counts once, as the more complete pack has it."""
    from metrics import Pack
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    (results / report.STUDY).mkdir()
    first = Pack(str(results / report.STUDY / "a.study.jsonl")).writer("lamb-lr0.01")
    first(study_header(0.01))
    first({"outer": 1, "step": 100, "loss": 1.0, "validation_accuracy": 0.5, "images_per_second": 1.0,
           "train_seconds": 1.0})
    second = Pack(str(results / report.STUDY / "b.study.jsonl"))
    write = second.writer("lamb-lr0.01")
    write(study_header(0.01))
    write({"outer": 1, "step": 100, "loss": 1.0, "validation_accuracy": 0.5, "images_per_second": 1.0,
           "train_seconds": 1.0})
    write({"resumed_after_outer": 1, "config": study_header(0.01)["config"]})
    write({"outer": 2, "step": 200, "loss": 0.5, "validation_accuracy": 0.7, "images_per_second": 1.0,
           "train_seconds": 2.0})
    write({"summary": {"train_seconds": 2.0}})
    second.writer("adam-lr0.003")({"config": {"optimiser": "adam", "learning_rate": 0.003}})
    second.writer("adam-lr0.003")({"crashed": True, "error": "RESOURCE_EXHAUSTED: out of memory"})
    runs = {r["name"]: r for r in report.load_runs(str(results / report.STUDY))}
    assert runs["lamb-lr0.01"]["status"] == "ok" and len(runs["lamb-lr0.01"]["records"]) == 2
    third = Pack(str(results / report.STUDY / "c.study.jsonl")).writer("lamb-lr0.01")  # as long, but cut off
    third(study_header(0.01))
    for outer in (1, 2):
        third({"outer": outer, "step": 100 * outer, "loss": 0.5, "validation_accuracy": 0.3, "images_per_second": 1.0,
               "train_seconds": 2.0})
    runs = {r["name"]: r for r in report.load_runs(str(results / report.STUDY))}
    assert runs["lamb-lr0.01"]["status"] == "ok" and runs["lamb-lr0.01"]["best"] == 0.7  # the one that ended
    assert runs["adam-lr0.003"]["status"] == "crashed"
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("| lamb-lr0.01 |") == 1 and "| adam-lr0.003 | 0 |  |  |  |  |  |  | crashed |" in text


def test_a_run_the_report_cannot_read_is_refused_with_one_line_naming_the_file(tmp_path, capsys):
    from metrics import Pack
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    (results / report.STUDY).mkdir()
    pack = results / report.STUDY / "old.study.jsonl"
    Pack(str(pack)).writer("lamb-lr0.01")({"resumed_after_outer": 1, "config": {"optimiser": "lamb"}})  # no header
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"report.py: error: {pack}: run lamb-lr0.01 does not start with its header")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"report.py: error: --results {tmp_path / 'nowhere'} is not a folder"


def test_a_run_recorded_before_the_rule_whose_finite_loss_blew_up_reads_as_diverged(tmp_path):
    """Its file ends with a summary and holds no diverged line: the status comes from its records' losses by
    train.py's rule (above 10 x ln(classes); 10 classes where the header does not say)."""
    folder = tmp_path / report.CRITICAL
    for name, loss, classes in [("blown", 3e12, None), ("spike", 20.0, None), ("two-classes", 7.0, 2)]:
        write_run(folder, name, "lamb", 0.03, 0, [0.3, 0.1, 0.1])
        path = folder / name / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        lines[2]["loss"] = loss
        if classes:
            lines[0]["classes"] = classes
        path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    status = {run["name"]: run["status"] for run in report.load_runs(str(folder))}
    assert status == {"blown": "diverged", "spike": "ok", "two-classes": "diverged"}


def test_the_empirical_model_is_recovered_from_steps_that_follow_it():
    batches = [32, 64, 128, 256, 512]
    model = critical_batch.fit(batches, [300 * (1 + 150 / b) for b in batches])
    assert model["s_min"] == pytest.approx(300, rel=1e-3) and model["b_crit"] == pytest.approx(150, rel=1e-3)
    assert model["e_min"] == pytest.approx(45000, rel=2e-3) and model["rms_log_error"] < 1e-3
    assert critical_batch.steps_at(model, 150) == pytest.approx(600, rel=1e-3)
    # At B_crit, S_min (1 + B_crit / B) and the examples' S_min (1 + B / B_crit) both give 600: away from it, the
    # steps' form, by hand.
    assert critical_batch.steps_at(model, 30) == pytest.approx(300 * 6, rel=1e-3)
    assert critical_batch.steps_at(model, 1500) == pytest.approx(300 * 1.1, rel=1e-3)
    assert critical_batch.steps_at({"s_min": 300.0, "b_crit": 150.0}, 30) == 1800.0


def write_batch_run(folder, optimiser, rate, batch, accuracies, noise, inner=40, seed=0):
    """A --batch-size run checked every `inner` steps, with its noise figures per record (tr(Sigma), |G|^2)."""
    name = f"{optimiser}-lr{rate:g}-b{batch}-s{seed}"
    os.makedirs(folder / name)
    config = {"optimiser": optimiser, "learning_rate": rate, "weight_decay": 0.0, "momentum": 0.9, "seed": seed,
              "schedule": "constant", "warmup_steps": 0, "inner_steps": inner, "outer_steps": 50, "batch_size": batch,
              "train_examples": None, "dtype": "float32", "dataset": "folder", "data_dir": "E", "target_accuracy": 0.7}
    header = {"config": config, "devices": 2, "backend": "cpu", "train_examples": 21600, "validation_examples": 2700,
              "examples_per_step": batch, "jax": "0"}
    records = [{"outer": i + 1, "step": inner * (i + 1), "loss": 1.0, "validation_accuracy": a, "noise_trace": t,
                "gradient_square": g} for i, (a, (t, g)) in enumerate(zip(accuracies, noise))]
    lines = [header, *records, {"summary": {}}]
    (folder / name / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_the_critical_batch_block_fits_the_best_rate_per_batch_size_and_pools_the_noise_there(tmp_path):
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    folder = results / report.CRITICAL
    noise = [(100.0, 1.0), (300.0, 1.0), (500.0, 1.0), (700.0, 1.0)]  # the last two outer loops: near the target
    # adam at 3 batch sizes; steps to 0.7 = 40 x (checks before it + 1): 160, 120, 80 steps
    write_batch_run(folder, "adam", 0.001, 64, [0.5, 0.6, 0.66, 0.71], noise)
    write_batch_run(folder, "adam", 0.003, 64, [0.5, 0.6, 0.6, 0.6], noise)  # not reached: the other rate is best
    write_batch_run(folder, "adam", 0.01, 64, [0.5, 0.1, 0.1, 0.1], noise)  # blew up (a finite loss): diverged
    path = folder / "adam-lr0.01-b64-s0" / "metrics.jsonl"
    path.write_text(path.read_text().replace('"step": 80, "loss": 1.0', '"step": 80, "loss": 3e12'))
    write_batch_run(folder, "adam", 0.001, 256, [0.5, 0.66, 0.7, 0.7], noise)
    write_batch_run(folder, "adam", 0.001, 1024, [0.66, 0.7, 0.7, 0.7], noise)
    # Muon from its own folder, checked every 10 steps: 40, 30 and 20 steps to 0.7
    for batch, accuracies in [(64, [0.5, 0.6, 0.66, 0.71]), (256, [0.5, 0.66, 0.7, 0.7]), (1024, [0.66, 0.7])]:
        write_batch_run(results / report.CRITICAL_FINE, "muon", 0.02, batch, accuracies, noise, inner=10)
    # Two more seeds at 64 (30 and 50 steps): the median, 40, stands; at 0.06 one seed of two does not reach it
    fine = results / report.CRITICAL_FINE
    write_batch_run(fine, "muon", 0.02, 64, [0.66, 0.6, 0.7], noise, inner=10, seed=1)
    write_batch_run(fine, "muon", 0.02, 64, [0.6, 0.6, 0.6, 0.6, 0.7], [*noise, noise[-1]], inner=10, seed=2)
    write_batch_run(fine, "muon", 0.06, 64, [0.7], noise, inner=10, seed=0)
    write_batch_run(fine, "muon", 0.06, 64, [0.6], noise, inner=10, seed=1)
    full = results / report.FULL_SCALE
    # Whole-set runs checked every 10 steps; the fastest to 0.7 is neither the first nor the last by name or
    # rate, nor the one of highest accuracy (1e-2), nor the slowest (7e-3); 9e-3 never gets there.
    for name, rate, accuracies in [("lamb_1e-2", 0.01, [0.5, 0.66, 0.72, 0.9]), ("lamb_2.5e-3", 0.0025,
                                   [0.5, 0.6, 0.65, 0.71]), ("lamb_5e-3", 0.005, [0.6, 0.71, 0.8]),
                                   ("lamb_7e-3", 0.007, [0.5, 0.6, 0.65, 0.69, 0.7]), ("lamb_9e-3", 0.009, [0.5, 0.6])]:
        write_run(full, name, "lamb", rate, 0, accuracies)
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| adam | 64 | 0.001, 0.003 (no), 0.01 (no, diverged) | 0.001 | 160 | 10,240 |" in text
    assert "| adam | 256 | 0.001 | 0.001 | 120 | 30,720 |" in text
    assert "| adam | 1,024 | 0.001 | 0.001 | 80 | 81,920 |" in text
    assert "validation split, a check every 40 steps (muon every 10); target 0.7; seed 0 (muon: seeds 0, 1, 2);" in text
    assert "| muon | 64 | 0.02, 0.06 (no) | 0.02 | 40 (3 seeds: 30 - 50) | 2,560 |" in text
    assert "| muon | 1,024 | 0.02 | 0.02 | 20 | 20,480 |" in text
    muon = critical_batch.fit([64, 256, 1024], [40, 30, 20])
    assert f"| muon | {muon['s_min']:,.0f} | {muon['b_crit']:,.0f} (" in text
    # B_simple (examples: tr(Sigma) per example over |G|^2) at the target: the outer loops from the first at >= 0.65
    # to the first at >= 0.7, pooled: b64 alone (loops 3, 4): (500 + 700) / (1 + 1) = 600.
    row = next(line for line in text.splitlines() if line.startswith("| adam | 64 |"))
    assert row.endswith("| 600 |")
    model = critical_batch.fit([64, 256, 1024], [160, 120, 80])
    fit_row = next(line for line in text.splitlines() if line.startswith("| adam | ") and "images)" in line)
    assert fit_row.startswith(f"| adam | {model['s_min']:,.0f} | {model['b_crit']:,.0f} (")
    assert "| 400 |" in fit_row  # pooled over the three: (1200 + 800 + 400) / 6
    # The prediction for the whole set (21,600 x 8 = 172,800 examples) by hand: S_min (1 + B_crit / B).
    predicted = model["s_min"] * (1 + model["b_crit"] / 172800)
    assert fit_row.endswith(f"| {predicted:,.0f} | {172800 / model['b_crit']:,.0f} |")
    assert ("best rate, 0.005, first reached 0.7 at step 20 (after step 10); the others: 0.0025 at step 40, 0.007 at "
            "step 50, 0.01 at step 30.") in text
    assert (folder / "critical_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def reaching(checks):
    """Validation accuracies that first reach 0.7 at the given check."""
    return [0.6] * (checks - 1) + [0.71]


def test_a_critical_batch_point_over_an_even_number_of_seeds_is_their_median_and_pools_every_seeds_noise(tmp_path):
    """Only the fine folder holds runs: the block stands on it (its plot goes there)."""
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    fine, noise = results / report.CRITICAL_FINE, [(100.0, 1.0)] * 30
    for seed, checks in enumerate([13, 14, 20, 27]):  # checked every 5: 65, 70, 100, 135 steps -> 85 (mean 92.5)
        write_batch_run(fine, "muon", 0.02, 64, reaching(checks), noise, inner=5, seed=seed)
    for seed, checks in enumerate([13, 14]):  # 65, 70 -> 67.5
        write_batch_run(fine, "muon", 0.02, 256, reaching(checks), noise, inner=5, seed=seed)
    # B_simple at 1024 pools both seeds' last two loops: (100 + 300 + 500 + 700) / 4 = 400 (seed 0 alone: 200)
    for seed, pair in enumerate([[(100.0, 1.0), (300.0, 1.0)], [(500.0, 1.0), (700.0, 1.0)]]):
        write_batch_run(fine, "muon", 0.02, 1024, [0.66, 0.71], pair, inner=5, seed=seed)
    report.main(["--results", str(results), "--out", str(tmp_path / "R.md")])
    text = (tmp_path / "R.md").read_text()
    assert "| muon | 64 | 0.02 | 0.02 | 85 (4 seeds: 65 - 135) | 5,440 |" in text
    assert "| muon | 256 | 0.02 | 0.02 | 67.5 (2 seeds: 65 - 70) | 17,280 |" in text
    assert "| muon | 1,024 | 0.02 | 0.02 | 10 (2 seeds: 10 - 10) | 10,240 | 400 |" in text
    assert "a check every 5 steps; target 0.7; seeds 0, 1, 2, 3;" in text
    assert (fine / "critical_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_scale_line_gives_each_optimiser_its_own_seeds_and_check_intervals():
    def run(optimiser, seed, inner=40):
        return {"config": {"optimiser": optimiser, "seed": seed, "inner_steps": inner}}
    runs = [run("adam", 0), run("adam", 1, 10), run("lamb", 0), run("sgd", 0), *(run("muon", s, 10) for s in (0, 1, 2))]
    assert report.seeds_text(runs) == "seed 0 (adam: seeds 0, 1; muon: seeds 0, 1, 2)"
    assert report.checks_text(runs) == "a check every 40 steps (adam every 10 or 40; muon every 10)"
    assert report.seeds_text([run("adam", 1), run("muon", 1), run("muon", 2)]) == "seed 1 (muon: seeds 1, 2)"


def test_the_regularisers_blocks_group_seeds_by_optimiser_rate_and_regularisers_and_credit_an_average_its_own(
        tmp_path):
    results = tmp_path / "results"
    write_run(results / report.SWEEP, "lamb-s0", "lamb", 0.01, 0, [0.3, 0.5])
    folder = results / report.REGULARISED
    report.main(["--results", str(results), "--out", str(tmp_path / "EARLY.md")])  # no runs of either block yet
    assert "No runs under" in (tmp_path / "EARLY.md").read_text()  # the 300-step block waits for its runs
    for seed, (plain, averaged) in enumerate([(0.50, 0.56), (0.52, 0.55), (0.48, 0.58)]):
        for name, accuracy, options in [("plain", plain, {}), ("ema", averaged, {"ema": 0.9})]:
            write_run(folder, f"lamb-{name}-s{seed}", "lamb", 0.01, seed, [0.3, 0.2, accuracy, accuracy - 0.03])
            path = folder / f"lamb-{name}-s{seed}" / "metrics.jsonl"
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            lines[0]["config"].update(options)
            for line in lines[1:-1]:
                line["train_accuracy"] = line["validation_accuracy"] + 0.1
                if options:  # the average: a little below the best check, then steady where the params fall
                    own = (accuracy if line["step"] >= 30 else line["validation_accuracy"]) - 0.01 * (seed + 1)
                    line["ema_validation_accuracy"], line["raw_validation_accuracy"] = own, line["validation_accuracy"]
                    line["validation_accuracy"] = max(line["validation_accuracy"], own)  # the better of the two
            path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    long = results / report.REGULARISED_LONG
    for seed, accuracy in enumerate([0.61, 0.60]):
        write_run(long, f"adam-s{seed}", "adam", 0.003, seed, [0.3, 0.5, accuracy, accuracy - 0.1, accuracy])
        path = long / f"adam-s{seed}" / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("\n".join(json.dumps({**line, "train_accuracy": 1.0} if "step" in line else line)
                                  for line in lines) + "\n")
    report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")])
    text = (tmp_path / "RESULTS.md").read_text()
    block, long_block = (text.split(f"<!-- report:{name} -->")[1].split(f"<!-- /report:{name} -->")[0]
                         for name in ("regularisers", "regularisers-long"))
    rows = [line for line in block.splitlines() if line.startswith("| lamb | 0.01 |")]
    # The average's own bests 0.56 - 0.01, 0.55 - 0.02, 0.58 - 0.03: median 0.55, below the recorded (better of
    # two) 0.56, which here are the trained weights' own. Its own accuracy does not fall in the second half
    # (steps 30, 40 of 40); the plain runs' falls 0.03 below their best at step 40, and the average's recorded
    # (better of two) 0.01, 0.02, 0.03.
    assert rows[0].startswith("| lamb | 0.01 | ema 0.9 | 0.5600 | 0.5500 - 0.5800 | 0.5500 / 0.5600 | 0.000 | +0.100 "
                              "| 30 |")
    assert rows[1].startswith("| lamb | 0.01 | none | 0.5000 | 0.4800 - 0.5200 |  | 0.030 | +0.100 | 2/3 seeds |")
    assert (folder / "regularisers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The 300-step block has its own runs, title and plot: the fall at step 40 (of 50) is 0.1.
    assert "| adam | 0.003 | none | 0.6050 | 0.6000 - 0.6100 |  | 0.100 | +0.395 |" in long_block
    assert "lamb" not in long_block
    assert "## Regularising a whole-set batch over 300 steps (reduced scale)" in text
    assert (long / "regularisers.png").exists()


def test_an_averaged_study_run_says_its_figures_are_the_better_of_two_and_gives_the_average_s_own(tmp_path):
    raw, own = [0.85, 0.93, 0.89], [0.80, 0.91, 0.905]  # the average steadier, its best below the raw params'
    records = [{"outer": i + 1, "step": 100 * (i + 1), "validation_accuracy": max(r, a), "raw_validation_accuracy": r,
                "ema_validation_accuracy": a, "images_per_second": 1e6, "train_seconds": 20.0 * (i + 1)}
               for i, (r, a) in enumerate(zip(raw, own))]
    run = {"name": "lamb-ema", "config": {"optimiser": "lamb", "learning_rate": 0.01, "inner_steps": 100, "ema": 0.99},
           "header": {"examples_per_step": 172800, "validation_examples": 30, "devices": 1, "backend": "gpu",
                      "jax": "0"}, "records": records, "status": "ok", "best": 0.93}
    rows = [line for line in "\n".join(report.study_block([run], str(tmp_path))).splitlines()
            if line.startswith("| lamb-ema")]
    assert rows[0].startswith("| lamb-ema (each check the better of its params and their average; the average alone: "
                              "best 0.9100, last 0.9050) | 3 | 0.9300 |")


def test_the_study_block_names_each_optimiser_s_best_run_among_several():
    """The best is neither the first run given, nor the first by name, nor at the lowest or highest rate: the
    choice is by best validation accuracy alone (one best per optimiser)."""
    def run(name, optimiser, rate, accuracies):
        records = [{"outer": i + 1, "step": 100 * (i + 1), "validation_accuracy": a, "images_per_second": 1e6,
                    "train_seconds": 20.0 * (i + 1)} for i, a in enumerate(accuracies)]
        return {"name": name, "config": {"optimiser": optimiser, "learning_rate": rate, "inner_steps": 100},
                "header": {"examples_per_step": 172800, "validation_examples": 30, "devices": 1, "backend": "gpu",
                           "jax": "0"}, "records": records, "status": "ok", "best": max(accuracies)}
    runs = [run("lamb-a", "lamb", 0.02, [0.5, 0.7]), run("lamb-c", "lamb", 0.01, [0.6, 0.92, 0.9]),
            run("lamb-b", "lamb", 0.005, [0.8, 0.85]), run("adam-a", "adam", 0.001, [0.4, 0.88]),
            run("adam-b", "adam", 0.003, [0.9, 0.6])]
    text = "\n".join(report.study_block(runs, "results/gpu-study"))
    assert "| lamb | 0.005, 0.01, 0.02 | lamb-c | 0.9200 |" in text
    assert "| adam | 0.001, 0.003 | adam-b (highest tried: not bracketed) | 0.9000 |" in text


def test_an_averaged_setting_gives_its_weights_own_best_not_the_better_of_two_and_on_how_many_seeds(tmp_path):
    """Where the average beats the trained weights at a check, the weights' own best is below the recorded one
    (the better of the two); a seed whose records lack the average's figures is left out, and said."""
    def run(name, seed, raw, average):
        records = [{"outer": i + 1, "step": 10 * (i + 1), "loss": 1.0, "train_accuracy": 1.0, "inner_seconds": 1.0,
                    "validation_accuracy": max(r, a) if a is not None else r,
                    **({"raw_validation_accuracy": r, "ema_validation_accuracy": a} if a is not None else {})}
                   for i, (r, a) in enumerate(zip(raw, average))]
        config = {"optimiser": "lamb", "learning_rate": 0.01, "ema": 0.9, "inner_steps": 10, "outer_steps": 4,
                  "target_accuracy": 0.5, "seed": seed}
        return {"name": name, "config": config, "records": records, "status": "ok",
                "header": {"train_examples": 256, "examples_per_step": 2048, "validation_examples": 2700},
                "best": max(r["validation_accuracy"] for r in records)}
    runs = [run("s0", 0, [0.5, 0.6, 0.55, 0.58], [0.45, 0.62, 0.61, 0.6]),
            run("s1", 1, [0.5, 0.6, 0.55, 0.58], [None] * 4)]  # a seed recorded without the average's figures
    text = "\n".join(report.regularisers_block(runs, str(tmp_path)))
    row = next(line for line in text.splitlines() if line.startswith("| lamb | 0.01 | ema 0.9 |"))
    # Seed 0: the average's own best 0.62, the weights' own 0.60 (the better of two at each check: 0.62).
    assert "| 0.6200 / 0.6000 (1/2 seeds) |" in row
