"""Fill the generated tables of RESULTS.md from the metrics files of the measured runs under results/.

    python report.py [--results results] [--out RESULTS.md]

report.py computes, people write: each table lives between `<!-- report:NAME -->` and
`<!-- /report:NAME -->` markers and is replaced on every run; everything outside the markers (the
reading of the results, why we think so) is written by hand and left as it is. A new file gets a
skeleton of headings and markers. Every number comes from a run's `metrics.jsonl` (a run folder) or
`*.metrics.jsonl` (a kept file), or a bench JSON beside it, under the folders named in BLOCKS.
"""
import glob
import itertools
import json
import math
import os
import re
import statistics

from config import DEFAULT_EPSILONS, OPTAX_EPSILONS, check_output, defaults_before, parser
from errors import DataError, UsageError, diverged_loss, exit_on_failure
import critical_batch
import metrics
import noise_scale
from metrics import read_pack, unpack_bits

# The folders under --results each block of RESULTS.md is made from.
SWEEP, TUNING, LONGER, FINAL = "cpu-sweep-256x8", "cpu-tuning-256x8", "cpu-longer-256x8", "cpu-final-256x8"
FULL_SCALE = "h100-lamb-bf16-fullscale"
STUDY = "gpu-study"  # study.py's pack (and bench JSON) from a lent accelerator
EPSILON, BATCH = "cpu-epsilon-256x8", "cpu-batch-256x8"
CRITICAL = "cpu-batch-full"  # steps to a target against batch size on all 21,600 training images
CRITICAL_FINE = "cpu-batch-full-muon"  # the same for Muon, checked more often: it reaches the target in ~100 steps
REGULARISED = "cpu-regularisers-256x8"  # the regularisers of a whole-set batch, each alone and combined
REGULARISED_LONG = "cpu-regularisers-long-256x8"  # the same over 300 steps, where Adam fits its images exactly
LATER = ("cpu-muon-256x8", "cpu-lbfgs-256x8")  # Muon and L-BFGS at section 1's scale, beside its three
THRESHOLDS = (0.5, 0.9, 0.95)


def load_runs(folder: str) -> list[dict]:
    """Every run below `folder` (a run folder's metrics.jsonl, a kept NAME.metrics.jsonl, or each run of a
    study's pack, *.study.jsonl): its name, config, outer-loop records and how it ended. A run in several
    packs (a study run again after a cut) counts once, as the pack that holds most of it has it."""
    sources = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "metrics.jsonl"))):
        sources.append((os.path.basename(os.path.dirname(path)), path, None))
    for path in sorted(glob.glob(os.path.join(folder, "*.metrics.jsonl"))):
        sources.append((os.path.basename(path)[:-len(".metrics.jsonl")], path, None))
    for path in sorted(glob.glob(os.path.join(folder, "*.study.jsonl"))):
        try:
            sources += [(name, path, lines) for name, lines in read_pack(path).items()]
        except ValueError as error:
            raise DataError(f"{path} is not a study pack (one JSON object a line): {error}") from None
    runs = {}
    for name, path, lines in sources:
        run = read_run_lines(name, path, lines)
        kept = runs.get(name)
        if kept is None or (run["status"] == "ok", len(run["records"])) > (kept["status"] == "ok",
                                                                            len(kept["records"])):
            runs[name] = run
    return list(runs.values())


def read_run_lines(name: str, path: str, lines: list[dict] | None) -> dict:
    """One run from its lines (read from `path` when None); DataError naming the file if it cannot be read."""
    try:
        if lines is None:
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
    except ValueError as error:
        raise DataError(f"{path} is not a metrics file (one JSON object a line): {error}") from None
    if not lines or "config" not in lines[0] or "resumed_after_outer" in lines[0]:
        raise DataError(f"{path}: run {name} does not start with its header (the run's config), so it cannot be "
                        "read; a study pack from before every run's lines were complete: re-run the study, or "
                        "leave the file out")
    records = [r for r in lines[1:] if "validation_accuracy" in r]
    end = lines[-1]
    # The rule train.py stops by, applied to the records: runs from before it kept going with a finite blown-up loss.
    classes = metrics.header_classes(lines[0])
    diverged = any(r.get("diverged") or ("loss" in r and diverged_loss(r["loss"], classes)) for r in lines[1:])
    status = "diverged" if diverged else "crashed" if end.get("crashed") else \
        "ok" if "summary" in end else "cut off"
    config = [line["config"] for line in lines if "config" in line][-1]  # a resumed run's own, if extended
    config = {**defaults_before(config), **config}  # a header from before a flag existed: what the run used
    return {"name": name, "header": lines[0], "config": config, "records": records, "summary": end.get("summary"),
            "status": status, "best": max((r["validation_accuracy"] for r in records), default=0.0)}


def first_step(run: dict, accuracy: float):
    return next((r["step"] for r in run["records"] if r["validation_accuracy"] >= accuracy), None)


def setting(run: dict) -> tuple:
    c = run["config"]
    return (c["optimiser"], c["learning_rate"], c.get("weight_decay", 0.0) if c["optimiser"] != "sgd" else None,
            c.get("momentum") if c["optimiser"] == "sgd" else None, c.get("schedule", "constant"),
            c.get("warmup_steps", 0), c["epsilon"], c.get("lbfgs_memory") if c["optimiser"] == "lbfgs" else None)


def describe(key: tuple) -> str:
    """A setting in words; epsilon, as in sweep.py's run names, only where it is not optax's."""
    optimiser, rate, decay, momentum, schedule, warmup, epsilon, memory = key
    words = [optimiser, f"lr {rate:g}"] + ([f"memory {memory}"] if memory else [])
    words += [f"momentum {momentum:g}"] if optimiser == "sgd" else [f"wd {decay:g}"] if decay else []
    words += [f"eps {epsilon:g}"] if epsilon != OPTAX_EPSILONS[optimiser] else []
    words += [f"{schedule} ({warmup} warmup steps)"] if schedule != "constant" else []
    return " ".join(words)


def by_setting(runs: list[dict]) -> list[dict]:
    """Runs grouped by setting (all but the seed), best median first."""
    groups = {}
    for run in runs:
        groups.setdefault(setting(run), []).append(run)
    rows = []
    for key, members in groups.items():
        scores = [m["best"] for m in members]
        steps = {t: [first_step(m, t) for m in members] for t in THRESHOLDS}
        rows.append({"key": key, "runs": members, "median": statistics.median(scores), "low": min(scores),
                     "high": max(scores), "seeds": len(members),
                     "diverged": sum(m["status"] == "diverged" for m in members),
                     "steps": {t: statistics.median(s) if all(v is not None for v in s) else None
                               for t, s in steps.items()},
                     "reached": {t: sum(v is not None for v in s) for t, s in steps.items()},
                     "final_loss": statistics.median(m["records"][-1]["loss"] for m in members if m["records"])
                     if any(m["records"] for m in members) else float("nan")})
    return sorted(rows, key=lambda r: -r["median"])


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion correct / total."""
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def host_zero_count(total: int) -> int:
    """How many validation images the original scored: the first of 4 hosts' contiguous quarters of the
    split (675 of 2,700), cut to a multiple of its 8 devices (672)."""
    return total // 4 // 8 * 8  # 0 for a split too small to say


def per_image(run: dict) -> dict | None:
    """From a run's per-image records: its best outer loop's accuracy on every validation image with a 95%
    interval (optimistic: the best is chosen on the same images), the last outer loop's with its interval (a
    choice made without looking at them), and the blog's figure: the best outer loop's accuracy on host 0's
    672 images."""
    records = [r for r in run["records"] if "validation_correct" in r]
    if not records:
        return None
    total = run["header"]["validation_examples"]
    bits = [unpack_bits(r["validation_correct"], total) for r in records]
    best = max(range(len(bits)), key=lambda i: bits[i].sum())
    host = host_zero_count(total)
    return {"accuracy": bits[best].mean(), "interval": wilson_interval(int(bits[best].sum()), total),
            "last": bits[-1].mean(), "last_interval": wilson_interval(int(bits[-1].sum()), total), "total": total,
            "host_images": host, "host_zero": max(b[:host].mean() for b in bits) if host else None}


def host_zero_words(config: dict, count: int) -> str:
    """Which images the blog-style figure is on, for the run's data source: only TFDS keeps the original's
    order of the validation split, so only there are the first 672 the images the original's host 0 scored."""
    if config.get("dataset", "tfds") == "tfds":
        return f"the {count} validation images the original's host 0 scored (TFDS's order of train[80%:90%])"
    if config["dataset"] == "folder":
        return (f"the first {count} validation images in the folder source's order, a seeded random quarter of "
                "the split: statistically like the original's host 0 images, not the same ones")
    return f"the first {count} validation images (synthetic data)"


def edge_note(rate: float, rates: list[float]) -> str:
    """A best rate at the edge of the rates tried is not bracketed: a better one may lie beyond it."""
    if len(rates) < 2:
        return " (the only rate tried: not bracketed)"
    if min(rates) < rate < max(rates):
        return ""
    return " (lowest tried: not bracketed)" if rate == min(rates) else " (highest tried: not bracketed)"


def steps_text(row: dict, threshold: float) -> str:
    if row["steps"][threshold] is not None:
        return f"{row['steps'][threshold]:g}"
    return f"{row['reached'][threshold]}/{row['seeds']} seeds" if row["reached"][threshold] else "not reached"


def table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def scale_text(run: dict) -> str:
    h, c = run["header"], run["config"]
    return (f"{h['train_examples']:,} training images x 8 dihedral forms = {h['examples_per_step']:,} images "
            f"per step, the full {h['validation_examples']:,}-image validation split, {c['outer_steps']} outer "
            f"loops of {c['inner_steps']} steps")


def command_text(run: dict, script: str, extra: str = "", runs: list[dict] | None = None) -> str:
    """The command that made a run (or the runs of one sweep), from its header (CPU runs name their emulated
    device count), with the epsilons it used wherever they are not today's defaults."""
    c, h = run["config"], run["header"]
    devices = f"JAX_NUM_CPU_DEVICES={h['devices']} " if h["backend"] == "cpu" else ""
    data = f"--dataset {c['dataset']}" + (f" --data-dir {c['data_dir']}" if c.get("data_dir") else "")
    examples = f" --train-examples {c['train_examples']}" if c.get("train_examples") else ""
    if "epsilon" not in extra:
        extra = f"{extra} {epsilon_flags(runs or [run], script)}".strip()
    return (f"{devices}python {script} {data}{examples} --inner-steps {c['inner_steps']} "
            f"--outer-steps {c['outer_steps']} {extra} --target-accuracy {c['target_accuracy']:g}").strip()


def epsilon_flags(runs: list[dict], script: str) -> str:
    """The epsilon flags that remake these runs under today's defaults: sweep.py lists each optimiser's; a
    train.py command is one run's, so several epsilons there are a placeholder that the rows resolve."""
    flags = []
    optimisers = sorted({r["config"]["optimiser"] for r in runs}) if script == "sweep.py" else \
        [runs[0]["config"]["optimiser"]]
    for optimiser in optimisers:
        used = {r["config"]["epsilon"] for r in runs if r["config"]["optimiser"] == optimiser} - {None}
        if used and used != {DEFAULT_EPSILONS[optimiser]}:
            values = ",".join(f"{e!r}" for e in sorted(used, reverse=True))
            flags.append(f"--{optimiser}-epsilons {values}" if script == "sweep.py" else
                         f"--epsilon {values}" if len(used) == 1 else "--epsilon EPSILON")
    return " ".join(flags)


def device_text(run: dict, folder: str) -> str:
    """The device a run used: its header's, or that of a bench JSON kept beside it (older headers lack it)."""
    kind = run["header"].get("device_kind")
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            kind = kind or json.load(f).get("device_kind")
    return f"{run['header']['devices']} x {kind or run['header']['backend']} (jax {run['header']['jax']})"


def sweep_block(runs: list[dict], folder: str) -> tuple[list[str], dict]:
    settings = by_setting(runs)
    optimisers = sorted({s["key"][0] for s in settings})
    best_of = {o: next(s for s in settings if s["key"][0] == o) for o in optimisers}
    ranking = sorted(optimisers, key=lambda o: -best_of[o]["median"])
    rates = {o: ", ".join(f"{r:g}" for r in sorted({s["key"][1] for s in settings if s["key"][0] == o}))
             for o in optimisers}
    first = runs[0]
    seeds = sorted({r["config"]["seed"] for r in runs})
    lines = [f"Scale: {scale_text(first)}; seeds {', '.join(map(str, seeds))}; {device_text(first, folder)}.", "",
             "```", command_text(first, "sweep.py", "--optimisers " + ",".join(optimisers) + " " + " ".join(
                 f"--{o}-rates {rates[o].replace(', ', ',')}" for o in optimisers) +
                 f" --seeds {','.join(map(str, seeds))} --output-dir runs/sweep", runs), "```", "",
             f"{len(runs)} runs, {sum(r['summary']['train_seconds'] for r in runs if r['summary']) / 60:.0f} "
             "minutes of training in all. Per optimiser, its setting with the best median (over seeds) of the "
             "best validation accuracy:", ""]
    tried = {o: sorted({s["key"][1] for s in settings if s["key"][0] == o}) for o in optimisers}
    lines.append(table(["rank", "optimiser", "rates tried", "best setting", "median best val. acc.",
                        "min - max over seeds", "median steps to 0.5", "to 0.90", "to 0.95"],
                       [[i + 1, o, rates[o], describe(best_of[o]["key"]) + edge_note(best_of[o]["key"][1], tried[o]),
                         f"{best_of[o]['median']:.4f}",
                         f"{best_of[o]['low']:.4f} - {best_of[o]['high']:.4f}",
                         *(steps_text(best_of[o], t) for t in THRESHOLDS)] for i, o in enumerate(ranking)]))
    lines += ["", "Every setting (best validation accuracy over the run, per seed):", ""]
    lines.append(table(["setting", "median", "min - max", "seeds", "diverged", "median final loss"],
                       [[describe(s["key"]), f"{s['median']:.4f}", f"{s['low']:.4f} - {s['high']:.4f}", s["seeds"],
                         s["diverged"], f"{s['final_loss']:.3f}"] for s in settings]))
    top = sorted(runs, key=lambda r: -r["best"])[:10]
    sgd_in_top = sum(r["config"]["optimiser"] == "sgd" for r in top)
    lines += ["", f"The {len(top)} best single runs:", ""]
    lines.append(table(["rank", "run", "best val. acc.", "at step"],
                       [[i + 1, r["name"], f"{r['best']:.4f}",
                         max(r["records"], key=lambda x: x["validation_accuracy"])["step"]]
                        for i, r in enumerate(top)]))
    lines += ["", f"![validation accuracy against step]({folder}/curves.png)", "",
              f"![best validation accuracy against learning rate]({folder}/accuracy_vs_rate.png)"]
    facts = {"ranking": ranking, "best_of": best_of, "sgd_in_top": sgd_in_top, "top": len(top), "settings": settings}
    return lines, facts


def tuning_block(runs: list[dict], baseline: dict, folder: str) -> tuple[list[str], dict]:
    settings = by_setting(runs)
    rows = [[describe(baseline["key"]) + " (the sweep's best LAMB)", f"{baseline['median']:.4f}",
             f"{baseline['low']:.4f} - {baseline['high']:.4f}", steps_text(baseline, 0.5),
             f"{baseline['final_loss']:.3f}"]]
    rows += [[describe(s["key"]), f"{s['median']:.4f}", f"{s['low']:.4f} - {s['high']:.4f}", steps_text(s, 0.5),
              f"{s['final_loss']:.3f}"] for s in settings]
    lines = ["```"]
    for schedule in sorted({(r["config"]["schedule"], r["config"]["warmup_steps"]) for r in runs}):
        group = [r for r in runs if (r["config"]["schedule"], r["config"]["warmup_steps"]) == schedule]
        lines.append(command_text(group[0], "sweep.py", "--optimisers lamb --lamb-rates " + ",".join(
            f"{v:g}" for v in sorted({r["config"]["learning_rate"] for r in group})) + " --weight-decays " + ",".join(
            f"{v:g}" for v in sorted({r["config"]["weight_decay"] for r in group})) +
            f" --schedule {schedule[0]} --warmup-steps {schedule[1]} --seeds " +
            ",".join(str(v) for v in sorted({r["config"]["seed"] for r in group})) + " --output-dir runs/tuning",
            group))
    lines += ["```", ""]
    lines.append(table(["setting", "median best val. acc.", "min - max over seeds", "median steps to 0.5",
                        "median final loss"], rows))
    lines += ["", f"![validation accuracy against step, tuning]({folder}/curves.png)"]
    return lines, {"best": settings[0]}


def longer_block(runs: list[dict], folder: str) -> tuple[list[str], list[dict]]:
    """The best constant-rate setting of each optimiser, run for more steps: does the ranking hold?"""
    optimisers = sorted({r["config"]["optimiser"] for r in runs})
    rate = {r["config"]["optimiser"]: r["config"]["learning_rate"] for r in runs}
    rates = " ".join(f"--{o}-rates {rate[o]:g}" for o in optimisers)
    lines = ["```", command_text(runs[0], "sweep.py", f"--optimisers {','.join(optimisers)} {rates} --seeds "
                                 + ",".join(str(v) for v in sorted({r["config"]["seed"] for r in runs}))
                                 + " --output-dir runs/longer", runs), "```", ""]
    rows = []
    for run in sorted(runs, key=lambda r: -r["best"]):
        best = max(run["records"], key=lambda x: x["validation_accuracy"])
        rows.append([run["name"], f"{run['best']:.4f}", best["step"], first_step(run, 0.5) or "not reached",
                     first_step(run, 0.6) or "not reached", f"{run['records'][-1]['loss']:.3f}",
                     f"{run['records'][-1]['train_accuracy']:.4f}"])
    lines.append(table(["run", "best val. acc.", "at step", "step to 0.5", "step to 0.6", "final loss",
                        "final train acc."], rows))
    lines += ["", f"![validation accuracy against step, longer runs]({folder}/curves.png)"]
    return lines, sorted(runs, key=lambda r: -r["best"])


def final_block(run: dict) -> list[str]:
    s, h = run["summary"], run["header"]
    flags = " ".join(f"--{k.replace('_', '-')} {run['config'][k]:g}" for k in ("learning_rate", "weight_decay"))
    return ["```", command_text(run, "train.py", f"--optimiser {run['config']['optimiser']} {flags} --schedule "
                                f"{run['config']['schedule']} --warmup-steps {run['config']['warmup_steps']} "
                                f"--seed {run['config']['seed']} --eval-test --output-dir runs/final"), "```", "",
            f"Best validation accuracy {s['best']['validation_accuracy']:.4f} at step {s['best']['step']} (of "
            f"{h['validation_examples']:,} validation images); **test accuracy of those params "
            f"{s['test_accuracy']:.4f}**."]


def full_scale_block(runs: list[dict], folder: str) -> list[str]:
    rows = []
    for run in sorted(runs, key=lambda r: r["config"]["learning_rate"]):
        records = run["records"]
        best = max(records, key=lambda r: r["validation_accuracy"])
        speed = statistics.median(r["images_per_second"] for r in records[1:])  # the first includes compiling
        outer_seconds = statistics.median(r["inner_seconds"] for r in records[1:])
        reached = first_step(run, 0.95)
        rows.append([describe(setting(run)), len(records), f"{best['validation_accuracy']:.4f}", best["step"],
                     reached or "not reached", run["status"], f"{speed:,.0f}", f"{outer_seconds:.1f}"])
    c, h = runs[0]["config"], runs[0]["header"]
    return [f"{h['examples_per_step']:,} images per step (all {h['train_examples']:,} training images x 8), "
            f"{h['validation_examples']:,} validation images, {c['inner_steps']} steps per outer loop, "
            f"{c['dtype']} compute; {device_text(runs[0], folder)}:", "", "```",
            command_text(runs[0], "train.py", f"--optimiser {c['optimiser']} --learning-rate RATE "
                                              f"--dtype {c['dtype']}", runs),
            "```", "",
            table(["setting", "outer loops run", "best val. acc.", "at step", "step to 0.95", "status",
                   "median images/s", "median s per outer loop"], rows)]


def study_block(runs: list[dict], folder: str) -> list[str]:
    """The full-scale study, a row per run: best validation accuracy on every image with its 95% interval,
    the last outer loop's, the blog's own figure from the same per-image record, steps and seconds to 0.90
    and 0.95, speed."""
    described = next((r for r in runs if "examples_per_step" in r["header"]), runs[0])
    h, c = described["header"], described["config"]
    lines = [f"{h.get('examples_per_step', 0):,} images per step, {h.get('validation_examples', 0):,} validation "
             f"images, {c.get('inner_steps')} steps per outer loop, {c.get('dtype')} compute, {h.get('conv')} convs; "
             f"{device_text(described, folder)}. The best outer loop is chosen on the same validation images it is "
             "scored on, so its interval is optimistic; the last outer loop's is a choice made without looking at "
             "them." + (" Blog-style: the best outer loop's accuracy, to 2 decimals, on "
                        f"{host_zero_words(c, host_zero_count(h['validation_examples']))}."
                        if host_zero_count(h.get("validation_examples", 0)) else ""), ""]
    rows = []
    for run in sorted(runs, key=lambda r: -r["best"]):
        if not run["records"]:  # cut off (or diverged, or crashed) in its first outer loop
            rows.append([run["name"], 0, "", "", "", "", "", "", run["status"]])
            continue
        figures = per_image(run) or {}
        reach = {t: next((r for r in run["records"] if r["validation_accuracy"] >= t), None) for t in (0.9, 0.95)}
        speed = statistics.median(r["images_per_second"] for r in run["records"][1:] or run["records"])
        averaged = [r["ema_validation_accuracy"] for r in run["records"] if "ema_validation_accuracy" in r]
        name = run["name"] + (f" (each check the better of its params and their average; the average alone: best "
                              f"{max(averaged):.4f}, last {averaged[-1]:.4f})" if averaged else "")
        rows.append([name, len(run["records"]), f"{run['best']:.4f}" + (
                     " ({:.3f} - {:.3f})".format(*figures["interval"]) if figures else ""),
                     "{:.4f} ({:.3f} - {:.3f})".format(figures["last"], *figures["last_interval"]) if figures else "",
                     f"{figures['host_zero']:.2f}" if figures.get("host_zero") is not None else "",
                     *(f"{r['step']} ({r['train_seconds']:.0f} s)" if r else "not reached" for r in reach.values()),
                     f"{speed:,.0f}", run["status"]])
    lines.append(table(["run", "outer loops", "best val. acc. (95% interval)", "last outer loop (95% interval)",
                        "blog-style (host 0)", "step to 0.90 (train s)", "to 0.95", "median img/s", "status"], rows))
    by_optimiser = {}
    for run in runs:
        by_optimiser.setdefault(run["config"]["optimiser"], []).append(run)
    lines += ["", "Per optimiser, its best run:", ""]
    lines.append(table(["optimiser", "rates tried", "best run", "best val. acc."], [
        [o, ", ".join(f"{r:g}" for r in sorted({m["config"]["learning_rate"] for m in members})),
         (best := max(members, key=lambda m: m["best"]))["name"] + edge_note(
             best["config"]["learning_rate"], sorted({m["config"]["learning_rate"] for m in members})),
         f"{best['best']:.4f}"] for o, members in sorted(by_optimiser.items())]))
    return lines


def epsilon_block(runs: list[dict], folder: str) -> tuple[list[str], dict]:
    """LAMB's (and Adam's) epsilon at reduced scale: per optimiser, rate and epsilon, the median best
    validation accuracy over seeds with its range."""
    groups = {}
    for run in runs:
        c = run["config"]
        groups.setdefault((c["optimiser"], c["learning_rate"], c["epsilon"]), []).append(run["best"])
    first = runs[0]
    rates = {o: sorted({k[1] for k in groups if k[0] == o}) for o in sorted({k[0] for k in groups})}
    epsilons = {o: sorted({k[2] for k in groups if k[0] == o}, reverse=True) for o in rates}
    seeds = sorted({r["config"]["seed"] for r in runs})
    lines = [f"Scale: {scale_text(first)}; seeds {', '.join(map(str, seeds))}; {device_text(first, folder)}.", "",
             "```", command_text(first, "sweep.py", f"--optimisers {','.join(rates)} " + " ".join(
                 f"--{o}-rates {','.join(f'{r:g}' for r in rates[o])} --{o}-epsilons "
                 f"{','.join(f'{e:g}' for e in epsilons[o])}" for o in rates)
                 + f" --seeds {','.join(map(str, seeds))} --output-dir runs/epsilon"), "```", ""]
    rows, best = [], {}
    for (optimiser, rate, epsilon), scores in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                       -item[0][2])):
        median = statistics.median(scores)
        rows.append([optimiser, f"{rate:g}", f"{epsilon:g}", f"{median:.4f}", f"{min(scores):.4f} - {max(scores):.4f}",
                     len(scores)])
        if median > best.get(optimiser, (None, -1))[1]:
            best[optimiser] = ((rate, epsilon), median)
    lines.append(table(["optimiser", "rate", "epsilon", "median best val. acc.", "min - max over seeds", "seeds"],
                       rows))
    lines += ["", "Best per optimiser (by median): " + "; ".join(
        f"{o} lr {key[0]:g} epsilon {key[1]:g} ({median:.4f})" for o, (key, median) in sorted(best.items())) + ".",
              "", f"![best validation accuracy against epsilon]({folder}/accuracy_vs_epsilon.png)"]
    return lines, best


def batch_block(runs: list[dict], folder: str) -> list[str]:
    """Steps and images to the target against batch size (each point the best rate's median over seeds)."""
    first = runs[0]
    target = first["config"]["target_accuracy"]
    groups = {}
    for run in runs:
        c = run["config"]
        step = first_step(run, target)
        groups.setdefault((c["optimiser"], c["batch_size"], c["learning_rate"]), []).append(
            step if step is not None else math.inf)
    best = {}
    for (optimiser, batch, rate), steps in groups.items():
        median = statistics.median(steps)
        if (optimiser, batch) not in best or median < best[optimiser, batch][1]:
            best[optimiser, batch] = (rate, median, sum(math.isfinite(s) for s in steps), len(steps))
    optimisers = sorted({k[0] for k in groups})
    batches = sorted({k[1] for k in groups})
    seeds = sorted({r["config"]["seed"] for r in runs})
    largest_inner = min(r["config"]["inner_steps"] for r in runs)
    lines = [f"Scale: {first['header']['train_examples']} training images x 8 = {max(batches):,} images, the "
             f"largest batch; {first['header']['validation_examples']:,} validation images; target {target}; seeds "
             f"{', '.join(map(str, seeds))}; {device_text(first, folder)}.", "", "```",
             command_text(first, "sweep.py", f"--optimisers {','.join(optimisers)} " + " ".join(
                 f"--{o}-rates {','.join(f'{r:g}' for r in sorted({k[2] for k in groups if k[0] == o}))}"
                 for o in optimisers) + f" --batch-sizes {','.join(map(str, batches))} --seeds "
                 f"{','.join(map(str, seeds))} --stop-at-target --output-dir runs/batch", runs).replace(
                 f"--inner-steps {first['config']['inner_steps']}", f"--inner-steps {largest_inner}"), "```", ""]
    rows = []
    for optimiser in optimisers:
        for batch in batches:
            rate, median, reached, total = best[optimiser, batch]
            rows.append([optimiser, f"{batch:,}", f"{rate:g}", f"{median:g}" if math.isfinite(median) else
                         "not reached", f"{median * batch:,.0f}" if math.isfinite(median) else "not reached",
                         f"{reached}/{total}"])
    lines.append(table(["optimiser", "batch size", "best rate", "median steps to target", "median images to target",
                        "seeds reaching it"], rows))
    lines += ["", f"![steps and images to the target against batch size]({folder}/steps_vs_batch.png)"]
    return lines


def described(runs: list[dict]) -> dict:
    """A run whose header has the counts (one that crashed before its header has only a config)."""
    return next((r for r in runs if "train_examples" in r["header"]), runs[0])


def reach_range(run: dict, accuracy: float) -> tuple[int, int] | None:
    """(last step checked below `accuracy`, first step at or above it): where the run crossed it."""
    before = 0
    for r in run["records"]:
        if r["validation_accuracy"] >= accuracy:
            return before, r["step"]
        before = r["step"]
    return None


def noise_at(runs: list[dict], accuracy: float, below: float = 0.05) -> float | None:
    """B_simple in examples (images x 8) at an accuracy: each run's outer loops from the first with validation
    accuracy within `below` of it to the first reaching it, pooled over the runs (sums of tr(Sigma) and
    |G|^2, not a mean of ratios)."""
    picked = []
    for run in runs:
        start = next((i for i, r in enumerate(run["records"]) if r["validation_accuracy"] >= accuracy - below), None)
        end = next((i for i, r in enumerate(run["records"]) if r["validation_accuracy"] >= accuracy), None)
        if start is not None and end is not None:
            picked += run["records"][start:end + 1]
    images = noise_scale.pooled(picked, 8)
    return images * 8 if images else None


def critical_batch_block(runs: list[dict], folder: str, whole_set_runs: list[dict]) -> list[str]:
    """Steps and examples to the target against batch size on the full training set, each point its best
    rate; the empirical model fitted per optimiser against the measured noise scale, its prediction for the
    whole set, and the whole-set runs' own steps."""
    target = min(r["config"]["target_accuracy"] for r in runs)
    first = described(runs)
    examples = first["header"]["train_examples"] * 8
    groups = {}
    for run in runs:  # a run that crashed before its header has no batch size to place it
        c = run["config"]
        if c.get("batch_size"):
            groups.setdefault((c["optimiser"], c["batch_size"]), []).append(run)
    rows, points, fitted, noise = [], {}, {}, {}
    for (optimiser, batch), members in sorted(groups.items()):
        seeds = {}
        for member in members:
            seeds.setdefault(member["config"]["learning_rate"], []).append(first_step(member, target))
        # A rate's steps: the median over its seeds, where every seed reached the target.
        steps = {rate: statistics.median(s) if None not in s else None for rate, s in seeds.items()}
        diverged = {m["config"]["learning_rate"] for m in members if m["status"] == "diverged"}
        reached = {rate: step for rate, step in steps.items() if step is not None}
        best = min(reached, key=reached.get) if reached else None
        at_target = noise_at([m for m in members if first_step(m, target) is not None], target)
        marks = {rate: [word for word, mark in (("no", steps[rate] is None), ("diverged", rate in diverged)) if mark]
                 for rate in steps}
        spread = f" ({len(seeds[best])} seeds: {min(seeds[best]):,} - {max(seeds[best]):,})" \
            if best and len(seeds[best]) > 1 else ""
        rows.append([optimiser, f"{batch:,}", ", ".join(f"{r:g}" + (f" ({', '.join(marks[r])})" if marks[r] else "")
                                                       for r in sorted(steps)),
                     f"{best:g}" if best else "none reached", f"{reached[best]:,g}{spread}" if best else "",
                     f"{reached[best] * batch:,.0f}" if best else "", f"{at_target:,.0f}" if at_target else ""])
        if best:
            points.setdefault(optimiser, []).append((batch, reached[best]))
    for optimiser, measured in points.items():
        if len(measured) >= 3:
            fitted[optimiser] = critical_batch.fit([p[0] for p in measured], [p[1] for p in measured])
        noise[optimiser] = noise_at([r for r in runs if r["config"]["optimiser"] == optimiser
                                     and first_step(r, target) is not None], target)
    crossings = [(run["config"]["learning_rate"], reach_range(run, target)) for run in whole_set_runs]
    crossings = [(rate, crossing) for rate, crossing in crossings if crossing]
    whole = min(crossings, key=lambda c: c[1][1]) if crossings else None
    lines = [f"Scale: all {first['header']['train_examples']:,} training images x 8 = {examples:,} examples to draw "
             f"from, the whole {first['header']['validation_examples']:,}-image validation split, "
             f"{checks_text(runs)}; target {target}; {seeds_text(runs)}; {device_text(first, folder)}. Steps to the "
             "target are the first check at or above it (over several seeds their median, where every seed reached "
             "it: the column gives their count and range); B_simple (in examples: images x 8, the unit of "
             "--batch-size) is pooled over the outer loops from 0.05 below the target to reaching it.", "",
             table(["optimiser", "batch size", "rates tried ((no): not reached)", "best rate", "steps to target",
                    "examples to target", "B_simple there"], rows), ""]
    fit_rows = []
    for optimiser, model in sorted(fitted.items()):
        b_simple = noise.get(optimiser)
        fit_rows.append([optimiser, f"{model['s_min']:,.0f}", f"{model['b_crit']:,.0f} ({model['b_crit'] / 8:,.0f} "
                         "images)", f"{model['e_min']:,.0f}", f"{model['rms_log_error']:.2f}",
                         f"{b_simple:,.0f}" if b_simple else "", f"{critical_batch.steps_at(model, examples):,.0f}",
                         f"{examples / model['b_crit']:,.0f}"])
    lines.append(table(["optimiser", "S_min (steps)", "B_crit (examples)", "E_min (examples)", "rms error of log S",
                        "measured B_simple", f"predicted steps at {examples:,}", "whole set / B_crit"], fit_rows))
    if whole:
        lines += ["", f"The whole-set LAMB runs on the H100 (`{FULL_SCALE}`, checked every 100 steps): the best rate, "
                      f"{whole[0]:g}, first reached {target} at step {whole[1][1]} (after step {whole[1][0]}); the "
                      "others: " + ", ".join(f"{rate:g} at step {crossing[1]}" for rate, crossing in sorted(crossings)
                                              if rate != whole[0]) + "."]
    critical_batch.draw(os.path.join(folder, "critical_batch.png"), points, fitted, noise, examples,
                        ("lamb", *whole[1]) if whole else None)
    return lines + ["", f"![steps and examples to the target against batch size, with the fit]({folder}/"
                        "critical_batch.png)"]


def value_sets(runs: list[dict], key: str) -> tuple[tuple, list[tuple[tuple, list[str]]]]:
    """The values of a config key the runs used, per optimiser: the set most optimisers share, and each other
    set with the optimisers that used it."""
    used = {}
    for run in runs:
        used.setdefault(run["config"]["optimiser"], set()).add(run["config"][key])
    sharing = {}
    for optimiser, values in sorted(used.items()):
        sharing.setdefault(tuple(sorted(values)), []).append(optimiser)
    common = max(sharing, key=lambda values: (len(sharing[values]), -len(values), values))  # a tie: fewer values
    return common, sorted(((values, names) for values, names in sharing.items() if values != common),
                          key=lambda pair: pair[1])


def checks_text(runs: list[dict]) -> str:
    """How often the runs were checked: "a check every 40 steps (muon every 10)"."""
    common, others = value_sets(runs, "inner_steps")
    every = " or ".join
    text = "; ".join(f"{', '.join(names)} every {every(map(str, values))}" for values, names in others)
    return f"a check every {every(map(str, common))} steps" + (f" ({text})" if text else "")


def seeds_text(runs: list[dict]) -> str:
    """The seeds of the runs: "seed 0 (muon: seeds 0, 1, 2)"."""
    common, others = value_sets(runs, "seed")
    def seeds(values):
        return f"seed{'s' * (len(values) > 1)} {', '.join(map(str, values))}"
    text = "; ".join(f"{', '.join(names)}: {seeds(values)}" for values, names in others)
    return seeds(common) + (f" ({text})" if text else "")


def seconds_per_step(run: dict) -> float | None:
    """A run's median seconds per step, its first outer loop (with the compile) left out."""
    later = [r["inner_seconds"] / run["config"]["inner_steps"] for r in run["records"][1:]]
    return statistics.median(later) if later else None


def evaluations_per_step(run: dict) -> float | None:
    """Loss-and-gradient evaluations per step (L-BFGS records its line searches'; every other step makes one)."""
    counted = [r["evaluations"] for r in run["records"] if "evaluations" in r]
    return sum(counted) / (len(counted) * run["config"]["inner_steps"]) if counted else None


def later_optimisers_block(later: list[dict], blog: list[dict], folder: str) -> list[str]:
    """Muon and L-BFGS beside the best setting of each of section 1's optimisers: the best validation accuracy
    (median and range over seeds), median steps to 0.5, seconds and loss evaluations per step."""
    settings = by_setting(later)
    best_blog = [next(s for s in by_setting(blog) if s["key"][0] == name) for name in sorted(
        {r["config"]["optimiser"] for r in blog})]
    rows = []
    for s in sorted(settings + best_blog, key=lambda s: -s["median"]):
        seconds = [v for v in map(seconds_per_step, s["runs"]) if v is not None]
        evaluations = [v for v in map(evaluations_per_step, s["runs"]) if v is not None]
        copied = any(s is b for b in best_blog)
        rows.append([describe(s["key"]) + (" (section 1's best)" if copied else ""), f"{s['median']:.4f}",
                     f"{s['low']:.4f} - {s['high']:.4f}", s["seeds"], steps_text(s, 0.5),
                     f"{statistics.median(seconds):.2f}" if seconds else "-",
                     f"{statistics.median(evaluations):.2f}" if evaluations else "1"])
    commands = []
    for name in sorted({r["config"]["optimiser"] for r in later}):
        group = [r for r in later if r["config"]["optimiser"] == name]
        values = ",".join(sorted({f"{r['config']['learning_rate']:g}" for r in group}, key=float))
        extra = f"--optimisers {name} --{name}-rates {values}"
        if name == "lbfgs":
            extra += " --lbfgs-memories " + ",".join(str(m) for m in sorted({r["config"]["lbfgs_memory"]
                                                                             for r in group}))
        extra += " --seeds " + ",".join(str(v) for v in sorted({r["config"]["seed"] for r in group}))
        commands.append(command_text(group[0], "sweep.py", f"{extra} --output-dir runs/{name}", group))
    lines = [f"Scale: {scale_text(later[0])}; {device_text(later[0], folder)}.", "", "```", *commands, "```", "",
             table(["setting", "median best val. acc.", "min - max over seeds", "seeds", "median steps to 0.5",
                    "s per step (median)", "loss evaluations per step"], rows), "",
             "Seconds per step are of one sitting each, on the shared 2-core machine: compare within a row's "
             "runs, and across rows only roughly.", "",
             f"![validation accuracy against step and against loss evaluations]({folder}/later_optimisers.png)"]
    draw_later(os.path.join(folder, "later_optimisers.png"),
               [s["runs"][0] for s in best_blog] + [run for s in settings for run in s["runs"]])
    return lines


def draw_later(path: str, runs: list[dict]) -> None:
    """Validation accuracy against step, and against loss evaluations (L-BFGS's line searches counted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (by_step, by_evaluation) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in sorted(runs, key=lambda r: r["name"]):
        steps = [r["step"] for r in run["records"]]
        evaluations = list(itertools.accumulate(r.get("evaluations", run["config"]["inner_steps"])
                                                for r in run["records"]))
        accuracy = [r["validation_accuracy"] for r in run["records"]]
        for axes, x in ((by_step, steps), (by_evaluation, evaluations)):
            axes.plot(x, accuracy, marker=".", label=run["name"], alpha=0.8)
    by_step.set(xlabel="step", ylabel="validation accuracy", title="against steps")
    by_evaluation.set(xlabel="loss and gradient evaluations", title="against evaluations")
    by_evaluation.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def options_text(config: dict) -> str:
    """A run's regularisers in words ("none" for none; a config from before they existed has none)."""
    words = [f"ema {config['ema']:g}" if config.get("ema") else "",
             f"label smoothing {config['label_smoothing']:g}" if config.get("label_smoothing") else "",
             "biases excluded" if config.get("lamb_exclude_biases") else "",
             f"gradient penalty {config['gradient_penalty']:g} (blocks of {config['penalty_block']})"
             if config.get("gradient_penalty") else ""]
    return ", ".join(w for w in words if w) or "none"


def regularisers_block(runs: list[dict], folder: str) -> list[str]:
    """Per optimiser, rate and regularisers: the median best validation accuracy over seeds with its range,
    the training accuracy at that outer loop and the gap, steps to the target, and the cost per step."""
    target = described(runs)["config"]["target_accuracy"]
    groups = {}
    for run in runs:
        c = run["config"]
        groups.setdefault((c["optimiser"], c["learning_rate"], options_text(c)), []).append(run)
    rows, curves = [], {}
    for (optimiser, rate, options), members in sorted(groups.items(), key=lambda g: -statistics.median(
            m["best"] for m in g[1])):
        measured = [m for m in members if m["records"]]  # a seed that diverged in its first outer loop has none
        bests = [max(m["records"], key=lambda r: r["validation_accuracy"]) for m in measured]
        steps = [first_step(m, target) for m in members]
        accuracies = [b["validation_accuracy"] for b in bests] or [0.0]
        seconds = [statistics.median(r["inner_seconds"] / m["config"]["inner_steps"]
                                     for r in m["records"][1:] or m["records"]) for m in measured]
        # An averaged run's best is the better of two evaluations at each check: beside it, the average's own best
        # and its trained weights' own, which follow the plain run's path bit for bit (the average does not feed
        # back), so the two are a comparison within one run.
        pairs = [(max(r["ema_validation_accuracy"] for r in m["records"]),
                  max(r["raw_validation_accuracy"] for r in m["records"])) for m in measured
                 if all("ema_validation_accuracy" in r for r in m["records"])]
        falls = [largest_fall(m) for m in measured if m["status"] == "ok"]  # a cut-off run has no second half
        rows.append([optimiser, f"{rate:g}", options, f"{statistics.median(accuracies):.4f}",
                     f"{min(accuracies):.4f} - {max(accuracies):.4f}",
                     (f"{statistics.median(p[0] for p in pairs):.4f} / {statistics.median(p[1] for p in pairs):.4f}"
                      + (f" ({len(pairs)}/{len(measured)} seeds)" if len(pairs) < len(measured) else ""))
                     if pairs else "", f"{statistics.median(falls):.3f}" if falls else "",
                     f"{statistics.median(b['train_accuracy'] - b['validation_accuracy'] for b in bests):+.3f}"
                     if bests else "", f"{statistics.median(steps):g}" if all(s is not None for s in steps) else
                     f"{sum(s is not None for s in steps)}/{len(steps)} seeds",
                     f"{statistics.median(seconds):.2f}" if seconds else "",
                     f"{len(members)}" + (f" ({sum(m['status'] == 'diverged' for m in members)} diverged)"
                                          if any(m["status"] == "diverged" for m in members) else "")])
        curves[f"{optimiser} lr {rate:g}, {options}"] = measured
    lines = [f"{scale_text(described(runs))}", "", table(
        ["optimiser", "rate", "regularisers", "median best val. acc.", "min - max over seeds",
         "the average's own best / its weights' (medians)", "largest fall below the best so far, second half (median)",
         "train - val. acc. there (median)", f"median steps to {target}",
         "s per step (median)", "seeds"], rows)]
    draw_regularisers(os.path.join(folder, "regularisers.png"), curves)
    return lines + ["", f"![validation accuracy against step (an average's own), median over seeds]({folder}/"
                        "regularisers.png)"]


def own_accuracy(record: dict) -> float:
    """The validation accuracy of the params a run trains, or of their average where it keeps one."""
    return record.get("ema_validation_accuracy", record["validation_accuracy"])


def largest_fall(run: dict) -> float:
    """How far validation accuracy (an average's own) swings down from check to check once learning has slowed:
    the largest drop below the best of the checks before, over the checks in the second half of the run's steps
    (a curve that only rises has none)."""
    half = run["config"]["inner_steps"] * run["config"]["outer_steps"] / 2
    best, fall = -math.inf, 0.0
    for record in run["records"]:
        if record["step"] > half:
            fall = max(fall, best - own_accuracy(record))
        best = max(best, own_accuracy(record))
    return fall


def draw_regularisers(path: str, curves: dict[str, list[dict]]) -> None:
    """Validation accuracy against step (an average's own where a run keeps one), the median over seeds of each
    setting, LAMB's and the other optimisers' side by side (a panel only for those that ran)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {}  # "LAMB" / "the others" -> [(label, steps, medians)]
    for label, members in curves.items():
        if not members:
            continue
        steps = sorted({r["step"] for m in members for r in m["records"]})
        medians = [statistics.median(own_accuracy(r) for m in members for r in m["records"]
                                     if r["step"] == step) for step in steps]
        panels.setdefault("LAMB" if label.startswith("lamb") else "the others", []).append((label, steps, medians))
    names = [name for name in ("LAMB", "the others") if name in panels] or ["LAMB"]
    figure, axes = plt.subplots(1, len(names), figsize=(7.5 * len(names), 4.8), sharey=True, squeeze=False)
    for axis, name in zip(axes[0], names):
        for label, steps, medians in panels.get(name, []):
            axis.plot(steps, medians, marker=".", label=label, linestyle="-" if label.endswith("none") else "--")
        axis.set(xlabel="step", title=f"{name}: validation accuracy (an average's own), median over seeds")
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def findings_block(facts: dict, tuned: dict | None, longer: list[dict] | None, full_runs: list[dict]) -> list[str]:
    """The comparisons the reading of RESULTS.md rests on, computed; the reading itself is written by hand."""
    ranking, best_of = facts["ranking"], facts["best_of"]
    order = " > ".join(f"{o} ({best_of[o]['median']:.3f})" for o in ranking)
    steps_short = max(r["step"] for s in facts["settings"] for m in s["runs"] for r in m["records"])
    lines = [f"- Ranking at reduced scale ({steps_short} steps), by median best validation accuracy of each "
             f"optimiser's best rate: {order}. " + ("LAMB first, as in the blog." if ranking[0] == "lamb" else
                                                    f"The blog's LAMB-first ranking is **not** reproduced here: "
                                                    f"{ranking[0]} leads."),
             f"- SGD with momentum has {facts['sgd_in_top']} of the {facts['top']} best single runs (the blog had "
             "one in its top 10)."]
    if longer and len(longer) > 1:
        first, second = longer[0], longer[1]
        steps = max(r["step"] for r in first["records"])
        short_gap = best_of[first["config"]["optimiser"]]["median"] - best_of[second["config"]["optimiser"]]["median"]
        lines.append(f"- Over {steps} steps the order of the best runs is "
                     + " > ".join(f"{r['config']['optimiser']} ({r['best']:.3f})" for r in longer)
                     + f": a gap of {first['best'] - second['best']:.3f} against {short_gap:.3f} after {steps_short} "
                     f"steps. {first['config']['optimiser']} ends at training accuracy "
                     f"{first['records'][-1]['train_accuracy']:.2f}, {second['config']['optimiser']} at "
                     f"{second['records'][-1]['train_accuracy']:.2f}, with {first['header']['train_examples']} "
                     "training images.")
    if tuned:
        lamb = best_of["lamb"]
        gain = tuned["best"]["median"] - lamb["median"]
        spread = lamb["high"] - lamb["low"]
        lines.append(f"- Best tuned LAMB ({describe(tuned['best']['key'])}): median {tuned['best']['median']:.4f} "
                     f"against {lamb['median']:.4f} for the constant rate ({gain:+.4f}; the constant rate's "
                     f"spread over seeds is {spread:.4f}): " + (
                         "a clear gain at this scale." if gain > 2 * spread else
                         "a gain about the size of the seed-to-seed spread, so small at this scale." if gain > 0
                         else "no gain at this scale.")
                     + f" It stays below {ranking[0]}'s {best_of[ranking[0]]['median']:.4f}." * (ranking[0] != "lamb"
                     and tuned["best"]["median"] < best_of[ranking[0]]["median"]))
    if full_runs:
        best = max(full_runs, key=lambda r: r["best"])
        lines.append(f"- Full scale: the best LAMB run ({describe(setting(best))}) reached {best['best']:.4f} "
                     "validation accuracy; " + ("0.95 was reached." if any(first_step(r, 0.95) for r in full_runs)
                                                else "0.95 was **not** reached within the outer loops run."))
    return lines


# ----------------------------------------------------------------------------- RESULTS.md

MARKER = re.compile(r"<!-- report:(?P<name>[a-z-]+) -->\n.*?<!-- /report:(?P=name) -->", re.DOTALL)


def blocks(root: str) -> dict[str, tuple[str, list[str]]]:
    """Each generated block of RESULTS.md that has runs: name -> (section title for a new file, lines)."""
    made = {}
    if not os.path.isdir(root):
        raise UsageError(f"--results {root} is not a folder")
    sweep_runs = load_runs(os.path.join(root, SWEEP))
    if not sweep_runs:
        raise DataError(f"no runs under {os.path.join(root, SWEEP)}")
    lines, facts = sweep_block(sweep_runs, f"{root}/{SWEEP}")
    made["sweep"] = ("1. Optimiser comparison at reduced scale", lines)
    lamb, tuned, longer = facts["best_of"].get("lamb"), None, None
    tuning_runs = load_runs(os.path.join(root, TUNING))
    if tuning_runs and lamb:
        lines, tuned = tuning_block(tuning_runs, lamb, f"{root}/{TUNING}")
        made["tuning"] = ("2. Beating the constant-rate LAMB result (reduced scale)", lines)
    longer_runs = load_runs(os.path.join(root, LONGER))
    if longer_runs:
        lines, longer = longer_block(longer_runs, f"{root}/{LONGER}")
        made["longer"] = ("3. Longer runs (reduced scale)", lines)
    final_runs = load_runs(os.path.join(root, FINAL))
    if final_runs:
        made["final"] = ("4. Test accuracy of the chosen setting (reduced scale)", final_block(final_runs[0]))
    full_runs = load_runs(os.path.join(root, FULL_SCALE))
    if full_runs:
        made["full-scale"] = ("5. Full scale on a GPU", full_scale_block(full_runs, f"{root}/{FULL_SCALE}"))
    epsilon_runs = load_runs(os.path.join(root, EPSILON))
    if epsilon_runs:
        made["epsilon"] = ("LAMB's epsilon (reduced scale)", epsilon_block(epsilon_runs, f"{root}/{EPSILON}")[0])
    batch_runs = load_runs(os.path.join(root, BATCH))
    if batch_runs:
        made["batch"] = ("Steps to the target against batch size (reduced scale)",
                         batch_block(batch_runs, f"{root}/{BATCH}"))
    regulariser_runs = load_runs(os.path.join(root, REGULARISED))
    if regulariser_runs:
        made["regularisers"] = ("Regularising a whole-set batch (reduced scale)",
                                regularisers_block(regulariser_runs, f"{root}/{REGULARISED}"))
    long_runs = load_runs(os.path.join(root, REGULARISED_LONG))
    made["regularisers-long"] = ("Regularising a whole-set batch over 300 steps (reduced scale)",
                                 regularisers_block(long_runs, f"{root}/{REGULARISED_LONG}") if long_runs else
                                 Placeholder([f"No runs under {root}/{REGULARISED_LONG} yet."]))
    coarse, fine = load_runs(os.path.join(root, CRITICAL)), load_runs(os.path.join(root, CRITICAL_FINE))
    if coarse or fine:  # its plot goes with the first folder that has runs
        made["critical-batch"] = ("The critical batch on the full training set",
                                  critical_batch_block(coarse + fine, f"{root}/{CRITICAL if coarse else CRITICAL_FINE}",
                                                       full_runs))
    later = {name: load_runs(os.path.join(root, name)) for name in LATER}
    later_runs = [run for runs in later.values() for run in runs]
    home = next((f"{root}/{name}" for name, runs in later.items() if runs), None)  # its plot goes there
    made["later-optimisers"] = ("11. Muon and L-BFGS (reduced scale)",
                                later_optimisers_block(later_runs, sweep_runs, home) if later_runs
                                else Placeholder([f"No runs under {root}/{LATER[0]} or {root}/{LATER[1]} yet."]))
    study_runs = load_runs(os.path.join(root, STUDY))  # RESULTS.md keeps its block before a GPU has run it
    made["study"] = ("6. The full-scale study", study_block(study_runs, f"{root}/{STUDY}") if study_runs else
                     Placeholder([f"No study pack under {root}/{STUDY} yet: the study runs on a lent GPU "
                                  "(device/README.md), and this block fills itself from its pack."]))
    made["findings"] = ("What matched the blog, and what did not", findings_block(facts, tuned, longer, full_runs))
    return made


class Placeholder(list):
    """The lines of a block whose runs do not exist yet: filled where RESULTS.md has the block, else left out."""


def fill(text: str, made: dict[str, tuple[str, list[str]]]) -> str:
    """`text` with every marked block replaced by its newly computed lines; the rest untouched."""
    present = {m["name"] for m in MARKER.finditer(text)}
    unknown = present - set(made)
    missing = {name for name in set(made) - present if not isinstance(made[name][1], Placeholder)}
    if unknown:
        raise DataError(f"RESULTS.md has block(s) {sorted(unknown)} that no runs make")
    if missing:
        raise DataError(f"RESULTS.md lacks the marked block(s) {sorted(missing)}; add "
                        "<!-- report:NAME --> ... <!-- /report:NAME --> where each belongs")
    return MARKER.sub(lambda m: "\n".join([f"<!-- report:{m['name']} -->", *made[m["name"]][1],
                                           f"<!-- /report:{m['name']} -->"]), text)


def skeleton(made: dict[str, tuple[str, list[str]]]) -> str:
    """A new RESULTS.md: a heading and an empty marked block per study, for people to write around."""
    lines = ["# Results", ""]
    for name, (title, _) in made.items():
        lines += [f"## {title}", "", f"<!-- report:{name} -->", f"<!-- /report:{name} -->", ""]
    return "\n".join(lines)


def main(argv=None):
    exit_on_failure("report.py", write_report, argv)


def build_parser():
    p = parser("report.py", __doc__)
    p.add_argument("--results", default="results", help="folder holding the runs' metrics files")
    p.add_argument("--out", default="RESULTS.md", help="the file to fill (made with a skeleton if missing)")
    p.add_argument("--events", default=None, metavar="DIR",
                   help="instead, write TensorBoard event files of every run under --results into DIR/<folder>/<run> "
                        "(then: tensorboard --logdir DIR); nothing is retrained")
    return p


def write_events(root: str, out: str) -> None:
    """Every measured run under `root` as TensorBoard event files, a folder per run as its results folder has it."""
    if not os.path.isdir(root):
        raise UsageError(f"--results {root} is not a folder")
    written = 0
    for folder in sorted(f for f in os.listdir(root) if os.path.isdir(os.path.join(root, f))):
        for run in load_runs(os.path.join(root, folder)):
            target = os.path.join(out, folder, run["name"])
            if os.path.exists(target):
                raise UsageError(f"--events {out}: {target} exists; give an empty folder (event files add up)")
            metrics.write_events(target, [run["header"], *run["records"]])
            written += 1
    print(f"wrote the event files of {written} runs under {out}: tensorboard --logdir {out}")


def write_report(argv=None):
    args = build_parser().parse_args(argv)
    if args.events:  # then --out is not written
        check_output("--events", args.events, folder=True)
        return write_events(args.results, args.events)
    check_output("--out", args.out)
    made = blocks(args.results)
    text = open(args.out).read() if os.path.exists(args.out) else skeleton(made)
    filled = fill(text, made)  # before opening: a refused file stays as it was
    with open(args.out + ".tmp", "w") as f:
        f.write(filled)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
