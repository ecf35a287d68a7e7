"""Compare optimisers: a grid of train.py runs in one process, sharing the data and the compiled step.

    python sweep.py --optimisers lamb,adam,sgd --learning-rates 1e-3,3e-3,1e-2 --seeds 0,1,2 \
        --output-dir runs/sweep [any train.py flag, held fixed]

The data is loaded and augmented once and stays on the devices; rates, weight decays and momenta live
in the optimiser state, so each optimiser's step compiles once for the whole grid. Every run writes
`<output-dir>/<run>/metrics.jsonl`; the sweep writes `leaderboard.md`, `leaderboard.csv`, `curves.png`
and `accuracy_vs_rate.png`. Re-running the same command skips the runs already finished and resumes the
others; a run folder holding a run of another definition is refused. On a pod, run the same command on
every host.
"""
import csv
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
from typing import NamedTuple

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import jax
import numpy as np

import checkpoint
import train
from config import (BLOG_OPTIMISERS, DEFAULT_EPSILONS, DEFAULT_LEARNING_RATES, OPTAX_EPSILONS, OPTIMISERS,
                    WITH_WEIGHT_DECAY, Config, check, defaults_before)
from config import parse as parse_config
from config import parser
from errors import DataError, Diverged, Interrupted, PeerError, UsageError, diverged_loss, exit_on_failure
from metrics import header_classes
from parallel import init_distributed, log
from stopping import StopSignals

# A sweep's list flag for each train.py flag it varies: the single-value form would be overwritten by the grid.
SWEPT = {"--optimiser": "--optimisers", "--learning-rate": "--learning-rates (or --lamb-rates, ...)",
         "--seed": "--seeds", "--weight-decay": "--weight-decays", "--momentum": "--momenta",
         "--epsilon": "--epsilons (or --lamb-epsilons, --adam-epsilons)", "--batch-size": "--batch-sizes",
         "--lbfgs-memory": "--lbfgs-memories"}
WITH_EPSILON = ("lamb", "adam")
COLUMNS = ["rank", "run", "optimiser", "learning_rate", "weight_decay", "momentum", "epsilon", "lbfgs_memory",
           "batch_size", "seed", "schedule", "options", "status", "target_images", "best_validation_accuracy",
           "best_outer", "best_step", "test_accuracy", "target_step", "target_seconds", "final_loss"]


class Point(NamedTuple):
    """One run of the grid: its name (the swept values) and its config."""
    name: str
    config: Config


# Each optimiser's rates when none are given: its default rate (config.py) and the rates a factor of 3 about it;
# L-BFGS's line search chooses its step, so its one rate is optax's 1.
DEFAULT_RATES = {name: f"{rate / 3:g},{rate:g},{rate * 3:g}" for name, rate in DEFAULT_LEARNING_RATES.items()}
DEFAULT_RATES["lbfgs"] = "1"
# What each list may hold, checked with the list's own flag named (the run's own check would name train.py's).
LIST_CHECKS = {"seeds": (int, lambda v: True, "integers"),
               "weight_decays": (float, lambda v: 0 <= v < math.inf, ">= 0"),
               "momenta": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
               "rates": (float, lambda v: 0 < v < math.inf, "positive"),
               "epsilons": (float, lambda v: 0 < v < math.inf, "positive"),
               "batch_sizes": (int, lambda v: v > 0, "positive")}


def parse_list(text: str, flag: str, kind: str) -> list:
    """A comma-separated list flag as checked values, each once: a value given twice (1e-3 and 0.001 are one
    value) would run once and count twice as seeds of one setting, so it is dropped, and said."""
    convert, valid, meaning = LIST_CHECKS[kind]
    try:
        values = [convert(v) for v in text.split(",")]
    except ValueError:
        kinds = "integers" if convert is int else "numbers"
        raise UsageError(f"{flag} {text!r} is not a comma-separated list of {kinds}") from None
    bad = [v for v in values if not valid(v)]
    if bad:
        raise UsageError(f"{flag} must all be {meaning}, got {bad[0]:g}")
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        print(f"sweep.py: {flag} {text} lists a value more than once; each runs once: {','.join(map(str, unique))}",
              file=sys.stderr, flush=True)
    return unique


def build_parser():
    p = parser("sweep.py", __doc__)  # no prefix matching: --weight-decay must not pass for --weight-decays
    p.add_argument("--optimisers", default=",".join(BLOG_OPTIMISERS),
                   help=f"comma separated, from {OPTIMISERS} (default: the blog's three)")
    p.add_argument("--learning-rates", default=None,
                   help=f"peak learning rates for every optimiser, comma separated; default per optimiser "
                        f"{DEFAULT_RATES}")
    for name in OPTIMISERS:  # good rates differ by orders of magnitude between optimisers
        p.add_argument(f"--{name}-rates", help=f"peak learning rates for {name} only, instead of --learning-rates")
    p.add_argument("--seeds", default="0", help="initialisation seeds, comma separated")
    p.add_argument("--weight-decays", default="0", help="for lamb, adam and muon, comma separated")
    p.add_argument("--momenta", default="0.9", help="for sgd, comma separated")
    p.add_argument("--lbfgs-memories", default="10", help="for lbfgs: curvature pairs kept, comma separated")
    p.add_argument("--epsilons", default=None, help="for lamb and adam, comma separated (default: each one's own)")
    for name in WITH_EPSILON:
        p.add_argument(f"--{name}-epsilons", help=f"epsilons for {name} only, instead of --epsilons")
    p.add_argument("--batch-sizes", default=None,
                   help="global batch sizes, comma separated (default: the whole set only); see --batch-inner-steps")
    p.add_argument("--batch-inner-steps", choices=("scaled", "same"), default="scaled",
                   help="with --batch-sizes: scaled, each batch size B runs --inner-steps x (largest / B) steps per "
                        "outer loop (every outer loop sees as many images); same, every batch size runs --inner-steps "
                        "(every validation check comes after as many steps, so steps to the target are known to the "
                        "same share at every batch size)")
    p.add_argument("--output-dir", required=True, help="one folder per run, and the leaderboard")
    return p


def parse_args(argv=None):
    sweep, fixed = build_parser().parse_known_args(argv)
    for flag, listed in SWEPT.items():
        if any(a == flag or a.startswith(flag + "=") for a in fixed):
            raise UsageError(f"{flag} is swept by sweep.py: give its values as {listed}")
    optimisers = parse_optimisers(sweep.optimisers)
    refuse_unused(sweep, optimisers)
    rates = {}
    for name in OPTIMISERS:
        own = getattr(sweep, f"{name}_rates")
        flag = f"--{name}-rates" if own else "--learning-rates"
        rates[name] = parse_list(own or sweep.learning_rates or DEFAULT_RATES[name], flag, "rates")
    epsilons = {}
    for name in OPTIMISERS:
        own = getattr(sweep, f"{name}_epsilons", None)
        text = own or sweep.epsilons
        epsilons[name] = parse_list(text, f"--{name}-epsilons" if own else "--epsilons", "epsilons") if text else [None]
    grid = {"optimisers": optimisers, "learning_rates": rates, "epsilons": epsilons,
            "seeds": parse_list(sweep.seeds, "--seeds", "seeds"),
            "weight_decays": parse_list(sweep.weight_decays, "--weight-decays", "weight_decays"),
            "momenta": parse_list(sweep.momenta, "--momenta", "momenta"),
            "lbfgs_memories": parse_list(sweep.lbfgs_memories, "--lbfgs-memories", "batch_sizes"),
            "batch_sizes": parse_list(sweep.batch_sizes, "--batch-sizes", "batch_sizes") if sweep.batch_sizes
            else [None], "batch_inner_steps": sweep.batch_inner_steps}
    base = parse_config(fixed + ["--output-dir", sweep.output_dir])  # checks the fixed train.py flags
    if base.lamb_exclude_biases and "lamb" not in optimisers:
        raise UsageError(f"--lamb-exclude-biases applies to no run of this grid (--optimisers {','.join(optimisers)}):"
                         " leave it out")
    return grid, base


def refuse_unused(sweep, optimisers: list[str]) -> None:
    """A list flag that no run of the grid would use must not be accepted as if it applied: one for optimisers
    the sweep does not run, a shared list every optimiser overrides with its own, a batch option without batch
    sizes. Values are compared as numbers (0.90 is the default momentum)."""
    decayed = [name for name in optimisers if name in WITH_EPSILON]
    decaying = [name for name in optimisers if name in WITH_WEIGHT_DECAY]
    own_rates = [name for name in optimisers if getattr(sweep, f"{name}_rates")]
    own_epsilons = [name for name in decayed if getattr(sweep, f"{name}_epsilons")]
    unused = [f"--{name}-rates" for name in OPTIMISERS if getattr(sweep, f"{name}_rates") and name not in optimisers]
    unused += [f"--{name}-epsilons" for name in WITH_EPSILON if getattr(sweep, f"{name}_epsilons")
               and name not in optimisers]
    unused += ["--learning-rates"] * bool(sweep.learning_rates and len(own_rates) == len(optimisers))
    unused += ["--momenta"] * (parse_list(sweep.momenta, "--momenta", "momenta") != [0.9] and "sgd" not in optimisers)
    unused += ["--lbfgs-memories"] * (parse_list(sweep.lbfgs_memories, "--lbfgs-memories", "batch_sizes") != [10]
                                      and "lbfgs" not in optimisers)
    unused += ["--weight-decays"] * (parse_list(sweep.weight_decays, "--weight-decays", "weight_decays") != [0.0]
                                     and not decaying)
    unused += ["--epsilons"] * bool(sweep.epsilons and len(own_epsilons) == len(decayed))
    unused += ["--batch-inner-steps"] * (sweep.batch_inner_steps != "scaled" and not sweep.batch_sizes)
    if unused:
        raise UsageError(f"{unused[0]} applies to no run of this grid (--optimisers {','.join(optimisers)}; momenta "
                         "are sgd's, memories lbfgs's, weight decays lamb's, adam's and muon's, epsilons lamb's and "
                         "adam's, a shared list yields to each "
                         "optimiser's own, --batch-inner-steps needs --batch-sizes): leave it out")


def parse_optimisers(text: str) -> list[str]:
    names = list(dict.fromkeys(text.split(",")))
    unknown = [n for n in names if n not in OPTIMISERS]
    if unknown:
        raise UsageError(f"unknown optimiser(s) {unknown} in --optimisers; choose from {','.join(OPTIMISERS)}")
    return names


def grid_points(grid, base: Config) -> list[Point]:
    """One config per run, each checked like train.py's own flags."""
    points = []
    for optimiser in grid["optimisers"]:
        if optimiser == "lbfgs" and any(grid["batch_sizes"]):
            raise UsageError("--batch-sizes: lbfgs takes the whole set as its batch (a line search on a batch drawn "
                             "each step would search a different function every step): sweep it without --batch-sizes")
        epsilons = grid["epsilons"][optimiser] if optimiser in WITH_EPSILON else [None]
        largest = max(b or 0 for b in grid["batch_sizes"])
        uneven = [b for b in grid["batch_sizes"] if b and largest % b and grid.get("batch_inner_steps") != "same"]
        if uneven:
            raise UsageError(f"--batch-sizes: {uneven[0]} does not divide the largest, {largest}, so its outer loops "
                             "could not see as many images")
        coefficients = {"sgd": grid["momenta"], "lbfgs": grid.get("lbfgs_memories", [10])}.get(
            optimiser, grid["weight_decays"])
        for batch, rate, seed, coefficient, epsilon in itertools.product(
                grid["batch_sizes"], grid["learning_rates"][optimiser], grid["seeds"], coefficients, epsilons):
            swept = {"sgd": {"momentum": coefficient, "weight_decay": 0.0},
                     "lbfgs": {"lbfgs_memory": coefficient, "weight_decay": 0.0}}.get(optimiser,
                                                                                      {"weight_decay": coefficient})
            swept["lamb_exclude_biases"] = base.lamb_exclude_biases and optimiser == "lamb"  # LAMB's own
            scaled = batch and grid.get("batch_inner_steps", "scaled") == "scaled"
            inner = base.inner_steps * largest // batch if scaled else base.inner_steps  # as many images per outer
            config = dataclasses.replace(base, optimiser=optimiser, learning_rate=rate, seed=seed, batch_size=batch,
                                         inner_steps=inner, epsilon=DEFAULT_EPSILONS[optimiser] if epsilon is None
                                         else epsilon, **swept)
            points.append(at_home(config, base.output_dir))
    return points


def run_name(config: Config) -> str:
    """A run's folder name: the values a sweep varies. Epsilon is named when it is not optax's, a fixed
    reference rather than the default, which has changed: a name means the same run in every version."""
    detail = {"sgd": f"m{config.momentum:g}", "lbfgs": f"mem{config.lbfgs_memory}"}.get(
        config.optimiser, f"wd{config.weight_decay:g}")
    epsilon = "" if config.epsilon == OPTAX_EPSILONS[config.optimiser] else f"-eps{config.epsilon:g}"
    batch = f"-b{config.batch_size}" if config.batch_size else ""
    return (f"{config.optimiser}-lr{config.learning_rate:g}-{detail}{epsilon}{batch}{options_name(config)}-"
            f"{config.schedule}-s{config.seed}")


def options_name(config: Config) -> str:
    """The regularisers a run uses, in its name (none: nothing, so older names stay as they were)."""
    return "".join([f"-ema{config.ema:g}" if config.ema else "",
                    f"-ls{config.label_smoothing:g}" if config.label_smoothing else "",
                    "-xb" if config.lamb_exclude_biases else "",
                    f"-gp{config.gradient_penalty:g}b{config.penalty_block}" if config.gradient_penalty else ""])


def at_home(config: Config, output_dir: str) -> Point:
    """The run as a Point with its own folder under `output_dir`, checked like train.py's own flags."""
    name = run_name(config)
    config = dataclasses.replace(config, output_dir=os.path.join(output_dir, name))
    check(config)
    return Point(name, config)


def read_run(output_dir):
    """(header, outer-loop records, how it ended) from a run's metrics.jsonl, or None if it did not end."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or not ("summary" in lines[-1] or lines[-1].get("diverged") or lines[-1].get("crashed")):
        return None
    return lines[0], [r for r in lines[1:] if "validation_accuracy" in r], lines[-1]


def record_crash(config: Config, error):
    """Ends the run's metrics.jsonl with the error, keeping what the run wrote before it."""
    os.makedirs(config.output_dir, exist_ok=True)
    path = os.path.join(config.output_dir, "metrics.jsonl")
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(json.dumps({"config": dataclasses.asdict(config),
                                "run": checkpoint.run_definition(config)}) + "\n")
        f.write(json.dumps({"crashed": True, "error": f"{type(error).__name__}: {error}"}) + "\n")


def leaderboard_rows(points):
    rows = []
    for name, c in points:
        ended = read_run(c.output_dir)
        if ended is None:  # it did not end (a stop that left no closing line): nothing to rank yet
            continue
        header, records, end = ended
        best = max(records, key=lambda r: r["validation_accuracy"], default=None)
        # A run from before the rule for a finite loss that blew up is judged by it from its records.
        diverged = end.get("diverged") or any(diverged_loss(r["loss"], header_classes(header)) for r in records)
        status = "diverged" if diverged else "crashed" if end.get("crashed") else "ok"
        target = (end.get("summary") or {}).get("target") or {}
        batch = c.batch_size or header.get("examples_per_step", "")
        rows.append({"run": name, "optimiser": c.optimiser, "learning_rate": c.learning_rate, "batch_size": batch,
                     "target_images": target["step"] * batch if target and batch else "",
                     "weight_decay": c.weight_decay if c.optimiser in WITH_WEIGHT_DECAY else "",
                     "momentum": c.momentum if c.optimiser == "sgd" else "",
                     "epsilon": c.epsilon if c.optimiser in WITH_EPSILON else "", "seed": c.seed,
                     "lbfgs_memory": c.lbfgs_memory if c.optimiser == "lbfgs" else "",
                     "schedule": c.schedule, "options": options_name(c).strip("-") or "none", "status": status,
                     "best_validation_accuracy": best["validation_accuracy"] if best else 0.0,
                     "best_outer": best["outer"] if best else "", "best_step": best["step"] if best else "",
                     "test_accuracy": (end.get("summary") or {}).get("test_accuracy", ""),
                     "target_step": target.get("step", ""),
                     "target_seconds": round(target["train_seconds"], 2) if target else "",
                     "final_loss": records[-1]["loss"] if records else "", "curve": records})
    rows.sort(key=lambda r: (-r["best_validation_accuracy"], r["status"] != "ok", r["run"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def optimiser_summary(rows):
    """Per optimiser: its best run, and the setting with the best median over seeds with that spread. A
    setting includes the batch size: runs of other batch sizes are not seeds of one another."""
    summary = []
    for optimiser in sorted({r["optimiser"] for r in rows}):
        settings, mine = {}, [r for r in rows if r["optimiser"] == optimiser]
        for r in mine:
            key = (r["learning_rate"], r["weight_decay"], r["momentum"], r["epsilon"], r.get("batch_size", ""),
                   r.get("options", "none"), r.get("lbfgs_memory", ""))
            settings.setdefault(key, []).append(r["best_validation_accuracy"])
        key, scores = max(settings.items(), key=lambda item: statistics.median(item[1]))
        several_batches = len({r.get("batch_size", "") for r in mine}) > 1
        summary.append({"optimiser": optimiser,
                        "best": max(r["best_validation_accuracy"] for r in mine),
                        "best_setting": f"lr {key[0]:g}" + (f" wd {key[1]:g}" if key[1] != "" else "")
                                        + (f" momentum {key[2]:g}" if key[2] != "" else "")
                                        + (f" eps {key[3]:g}" if key[3] != "" else "")
                                        + (f" batch {key[4]}" if several_batches else "")
                                        + (f" {key[5]}" if key[5] != "none" else "")
                                        + (f" memory {key[6]}" if key[6] != "" else ""),
                        "median_over_seeds": statistics.median(scores), "spread": max(scores) - min(scores),
                        "seeds": len(scores)})
    return sorted(summary, key=lambda s: -s["median_over_seeds"])


def batch_summary(rows):
    """Per optimiser and batch size: the rate whose median steps to the target (over seeds; a seed that
    did not reach it counts as never) is smallest, with those median steps and images."""
    groups = {}
    for r in rows:
        if not isinstance(r["batch_size"], int):  # a run that crashed before it wrote its header
            continue
        steps = r["target_step"] if r["target_step"] != "" else math.inf
        groups.setdefault((r["optimiser"], r["batch_size"], r["learning_rate"]), []).append(steps)
    best = {}
    for (optimiser, batch, rate), steps in groups.items():
        median = statistics.median(steps)
        if (optimiser, batch) not in best or median < best[optimiser, batch]["median_steps"]:
            best[optimiser, batch] = {"optimiser": optimiser, "batch_size": batch, "learning_rate": rate,
                                      "median_steps": median, "median_images": median * batch,
                                      "reached": sum(math.isfinite(s) for s in steps), "seeds": len(steps)}
    return [best[key] for key in sorted(best)]


# The other numbers as they were given: 3.125e-08, 1e-05.
FOUR_PLACES = ("best_validation_accuracy", "test_accuracy", "final_loss")


def cell(column: str, value) -> str:
    """A leaderboard value: accuracy and loss to 4 places, seconds to 2, rates and coefficients as given."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if column in FOUR_PLACES else f"{value:.2f}" if column == "target_seconds" else f"{value:g}"


def write_leaderboard(output_dir, rows, summary, target):
    with open(os.path.join(output_dir, "leaderboard.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Leaderboard", "", f"Ranked by best validation accuracy; target accuracy {target}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |")
    lines += ["", "## Per optimiser", "", "| optimiser | best | best setting (by median) | median over seeds | "
              "spread (max - min) | seeds |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['optimiser']} | {s['best']:.4f} | {s['best_setting']} | {s['median_over_seeds']:.4f} "
                     f"| {s['spread']:.4f} | {s['seeds']} |")
    batches = batch_summary(rows)
    if len({b["batch_size"] for b in batches}) > 1:
        lines += ["", f"## Steps to the target ({target}) against batch size", "",
                  "| optimiser | batch size | best rate | median steps | median images | seeds reaching it |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {b['optimiser']} | {b['batch_size']} | {b['learning_rate']:g} | "
                  + (f"{b['median_steps']:g} | {b['median_images']:,.0f}" if math.isfinite(b["median_steps"])
                     else "not reached | not reached") + f" | {b['reached']}/{b['seeds']} |" for b in batches]
        lines += ["", "![steps and images to the target against batch size](steps_vs_batch.png)"]
    lines += ["", "![validation accuracy against step](curves.png)", "",
              "![best validation accuracy against learning rate](accuracy_vs_rate.png)", ""]
    with open(os.path.join(output_dir, "leaderboard.md"), "w") as f:
        f.write("\n".join(lines))


def write_plots(output_dir, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"lamb": "tab:blue", "adam": "tab:orange", "sgd": "tab:green", "muon": "tab:red",
               "lbfgs": "tab:purple"}
    figure, axes = plt.subplots(figsize=(8, 5))
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        axes.plot(steps, [p["validation_accuracy"] for p in r["curve"]], color=colours[r["optimiser"]],
                  alpha=0.6, linestyle="-" if r["status"] == "ok" else ":")
    for name, colour in colours.items():
        axes.plot([], [], color=colour, label=name)
    axes.set(xlabel="step", ylabel="validation accuracy", title="every run (dotted: diverged or crashed)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(os.path.join(output_dir, "curves.png"), dpi=100, bbox_inches="tight")
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, colour in colours.items():
        mine = [r for r in rows if r["optimiser"] == name]
        if not mine:
            continue
        axes.scatter([r["learning_rate"] for r in mine], [r["best_validation_accuracy"] for r in mine],
                     color=colour, alpha=0.6)
        rates = sorted({r["learning_rate"] for r in mine})
        medians = [statistics.median(r["best_validation_accuracy"] for r in mine if r["learning_rate"] == rate)
                   for rate in rates]
        axes.plot(rates, medians, color=colour, label=f"{name} (median over seeds)")
    axes.set(xscale="log", xlabel="peak learning rate", ylabel="best validation accuracy",
             title="best validation accuracy against learning rate")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(os.path.join(output_dir, "accuracy_vs_rate.png"), dpi=100, bbox_inches="tight")
    plt.close(figure)
    if len({r["epsilon"] for r in rows if r["epsilon"] != ""}) > 1:
        write_epsilon_plot(os.path.join(output_dir, "accuracy_vs_epsilon.png"), rows, colours, plt)
    batches = [b for b in batch_summary(rows) if math.isfinite(b["median_steps"])]
    if len({b["batch_size"] for b in batch_summary(rows)}) > 1:
        write_batch_plot(os.path.join(output_dir, "steps_vs_batch.png"), batches, colours, plt)


def write_epsilon_plot(path, rows, colours, plt):
    """Best validation accuracy against epsilon (log), a line per optimiser and rate through the medians
    over seeds, every seed a point."""
    figure, axes = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", "-.", ":"]
    for name, colour in colours.items():
        rates = sorted({r["learning_rate"] for r in rows if r["optimiser"] == name and r["epsilon"] != ""})
        for rate, style in zip(rates, styles):
            mine = [r for r in rows if r["optimiser"] == name and r["learning_rate"] == rate]
            epsilons = sorted({r["epsilon"] for r in mine})
            axes.scatter([r["epsilon"] for r in mine], [r["best_validation_accuracy"] for r in mine], color=colour,
                         alpha=0.5, s=15)
            axes.plot(epsilons, [statistics.median(r["best_validation_accuracy"] for r in mine if r["epsilon"] == e)
                                 for e in epsilons], style, color=colour, label=f"{name} lr {rate:g} (median)")
    axes.set(xscale="log", xlabel="epsilon", ylabel="best validation accuracy",
             title="best validation accuracy against epsilon (points: seeds)")
    axes.legend()
    axes.grid(alpha=0.3, which="both")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def write_batch_plot(path, batches, colours, plt):
    """Log-log: steps to the target against batch size per optimiser (each point its best rate), with
    perfect scaling (twice the batch, half the steps) through each optimiser's smallest batch; and the
    images to the target, which stay flat while scaling is perfect."""
    figure, (steps, images) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, colour in colours.items():
        mine = sorted((b for b in batches if b["optimiser"] == name), key=lambda b: b["batch_size"])
        if not mine:
            continue
        sizes = [b["batch_size"] for b in mine]
        steps.plot(sizes, [b["median_steps"] for b in mine], "o-", color=colour, label=name)
        steps.plot(sizes, [mine[0]["median_steps"] * sizes[0] / s for s in sizes], ":", color=colour,
                   label=f"{name}, perfect scaling")
        images.plot(sizes, [b["median_images"] for b in mine], "o-", color=colour, label=name)
    steps.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median steps to the target",
              title="steps to the target (best rate per point)")
    images.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median images to the target",
               title="images to the target")
    for axes in (steps, images):
        axes.legend()
        axes.grid(alpha=0.3, which="both")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


RUN, FINISHED, FAILED, REFUSE, TEST, UNTESTABLE = 0, 1, 2, 3, 4, 5
SKIPPED = {FINISHED: "finished earlier, skipped", FAILED: "ended earlier (diverged or crashed), skipped",
           UNTESTABLE: "finished earlier, skipped; --eval-test: its folder holds no checkpoint, whose best params the "
                       "test accuracy is measured from, so it has none"}


def verdict_of_process_0(config: Config) -> int:
    """From process 0's files, for every process: FINISHED (its metrics hold all it asks for, so nothing to
    redo, even where the checkpoints were not kept), TEST (finished, but --eval-test asks for a test accuracy
    its summary lacks: train.run measures it from the checkpoint's best params, training nothing),
    UNTESTABLE (the same without a checkpoint), FAILED (they end in a divergence or crash, which a re-run
    would repeat), RUN (not started, stopped midway, or extended: train.run resumes it), or a UsageError
    when the folder holds a run of another definition."""
    verdict, message = RUN, ""
    if jax.process_index() == 0:
        ended = read_run(config.output_dir)
        header = ended[0] if ended else read_header(config.output_dir)
        try:
            if header:
                checkpoint.refuse_other_run(header.get("run") or saved_definition(header["config"], config), config,
                                            "the metrics")
        except UsageError as error:
            verdict, message = REFUSE, str(error)
        else:
            if ended and "summary" not in ended[2]:
                verdict = FAILED
            elif ended:
                records = ended[1]
                done = {"outer": max((r["outer"] for r in records), default=0), "history": records}
                verdict = FINISHED if checkpoint.finished(config, done) else RUN
                if verdict == FINISHED and config.eval_test and "test_accuracy" not in ended[2]["summary"]:
                    verdict = TEST if has_checkpoint(config) else UNTESTABLE
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        verdict = int(multihost_utils.broadcast_one_to_all(np.int32(verdict)))
    if verdict == REFUSE:
        raise UsageError(message or f"process 0 found a run of a different definition in {config.output_dir}")
    return verdict


def has_checkpoint(config: Config) -> bool:
    """Whether the run's folder holds a checkpoint (looked at without creating the folder orbax would)."""
    if not os.path.isdir(os.path.join(config.output_dir, "checkpoints")):
        return False
    checkpoints = checkpoint.manager(config.output_dir, config.keep_checkpoints)
    try:
        return checkpoints.latest_step() is not None
    finally:
        checkpoints.close()


def saved_definition(saved_config: dict, config: Config) -> dict:
    """The run definition of a metrics header written before headers carried one. Such a header names its
    data folder by the path it had then, which may be gone or lead elsewhere from here: it counts as the
    folder `config` names now (the same images elsewhere resume, as the README promises)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    known = {**defaults_before(saved_config), **saved_config}  # not today's defaults: what that run used
    known["data_dir"] = config.data_dir if known.get("dataset") == "folder" else known.get("data_dir")
    return checkpoint.run_definition(Config(**{k: v for k, v in known.items() if k in fields}))


def read_header(output_dir):
    """The first line of a run's metrics.jsonl, or None."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        first = f.readline()
    return json.loads(first) if first.strip() else None


def run_sweep(grid, base: Config):
    points = grid_points(grid, base)
    init_distributed(base)  # before the signal handlers: jax's preemption notifier would replace them
    for batch in grid["batch_sizes"]:  # every point of the grid before the first trains
        train.check_batch_splits(batch, "--batch-sizes")
    with StopSignals() as stop:  # one for the whole sweep: a signal during one run's last outer loop stops it
        run_points(points, train.Shared(base), stop)
        if stop.agree():  # it came during the last run's last (compiled) outer loop, which finished the sweep
            raise Interrupted(stop.agreed, "during the last run's last outer loop, which completed the sweep: its "
                                           "runs are written (re-running the command writes the leaderboard)")
    if jax.process_index() != 0:
        return None, None
    rows = leaderboard_rows(points)
    summary = optimiser_summary(rows)
    write_leaderboard(base.output_dir, rows, summary, base.target_accuracy)
    write_plots(base.output_dir, rows)
    for s in summary:
        print(f"{s['optimiser']}: best {s['best']:.4f}; {s['best_setting']}: median {s['median_over_seeds']:.4f} "
              f"over {s['seeds']} seed(s), spread {s['spread']:.4f}", flush=True)
    return rows, summary


def check_programs(configs: list[Config], shared: train.Shared, flag: str = "--batch-sizes") -> None:
    """Every refusal of every run's programs (batch shares, penalty blocks: train.check_program), made with the
    data loaded once for them all, before the first run trains or makes its folder: a refusal at a later run
    would come after the earlier ones had trained."""
    for config in configs:
        train.check_program(config, shared.prepared(), flag)


def run_points(points: list[Point], shared: train.Shared, stop: StopSignals) -> None:
    checked = False
    for number, (name, config) in enumerate(points, 1):
        if stop.agree():  # every process together, between two runs
            raise Interrupted(stop.agreed, f"before run {number} of {len(points)} ({name}); re-running the same "
                                           "command goes on from there")
        verdict = verdict_of_process_0(config)
        if verdict not in (RUN, TEST):
            log(f"[{number}/{len(points)}] {name}: {SKIPPED[verdict]}")
            continue
        if not checked:  # at the first run that trains: a sweep of finished runs loads no data
            check_programs([point.config for point in points], shared)
            checked = True
        log(f"[{number}/{len(points)}] {name}" + (": finished earlier; --eval-test: the test accuracy of its best "
                                                  "params, from its checkpoint" if verdict == TEST else ""))
        try:
            train.run(config, shared, stop)
        except Diverged as error:
            log(f"[{number}/{len(points)}] {name}: diverged: {error}")
        except (KeyboardInterrupt, Interrupted, UsageError, PeerError, DataError):
            raise  # the sweep itself cannot go on; re-running the command resumes it
        except Exception as error:  # one broken run must not end the sweep; it is recorded as crashed
            log(f"[{number}/{len(points)}] {name}: crashed: {type(error).__name__}: {error}")
            if jax.process_index() == 0 and verdict == RUN:  # a finished run's results stand
                record_crash(config, error)


def main(argv=None):
    exit_on_failure("sweep.py", lambda: run_sweep(*parse_args(argv)))


if __name__ == "__main__":
    main()
