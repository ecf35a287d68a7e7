"""The full-scale study: a priority-ordered list of runs, in one process on one accelerator, within a budget.

    python study.py --dataset folder --data-dir EuroSAT_RGB --dtype bfloat16 --output-dir /tmp/study \
        --pack $OUT/study.jsonl [--budget-seconds 480] [--variant-from bench.json] [train.py flags]

A lent accelerator gives minutes, not hours, so the runs go in the order of what they answer (PLAN): LAMB with
warmup and cosine decay around the best full-scale constant rate, then Adam and SGD at their best
reduced-scale rates, then the rates that bracket each optimiser's best, then more seeds of the winner, then
the regulariser RESULTS.md found worth a full-scale run (a moving average of the weights). A run starts only
if the time it is estimated to take (its outer loops at the speed measured so far, and a compile for a new
program) fits what is left of `--budget-seconds`; the others are listed as skipped. Every line of every run's
metrics also goes to `--pack`, flushed at each outer loop, so a study cut off by the device's time limit still
returns one complete file. `--variant-from` takes the fastest correct step variant of a bench.py JSON (conv
formulation, GELU recomputation, microbatch).
Data and compiled programs are shared as in sweep.py; re-running the command skips finished runs.
"""
import dataclasses
import json
import math
import os
import statistics
import time

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import jax

import sweep
import train
from config import DEFAULT_LEARNING_RATES, Config, check_line_search, check_output
from config import parse as parse_config
from config import parser
from errors import DataError, Diverged, Interrupted, PeerError, UsageError, exit_on_failure
from metrics import Pack
from parallel import init_distributed, log
from stopping import StopSignals

# Why these (RESULTS.md, "The full-scale study"): LAMB's constant 1e-2 was the best full-scale rate and
# oscillated, 2e-2 diverged without warmup; warmup and cosine decay (a tenth of the run warming up, as at
# reduced scale, where it beat the constant rate) should settle 1e-2 and make 2e-2 usable. Adam's and SGD's
# first rates are their best at reduced scale; the later ones bracket each best from both sides. LAMB runs at
# its default epsilon, the original's effective 1e-6/32 (best at reduced scale); the fourth run repeats the first
# at optax's 1e-6, so the device says whether epsilon matters at full scale.
WARMUP_FRACTION = 0.1
PLAN = [
    {"optimiser": "lamb", "learning_rate": 1e-2},
    {"optimiser": "adam", "learning_rate": 3e-3},
    {"optimiser": "sgd", "learning_rate": 0.1},
    # Then the two later optimisers (RESULTS.md section 11): Muon at its default rate (config.py, from the
    # reduced-scale bracket), and L-BFGS, whose line search sets each step (so no schedule) on the exact
    # whole-set gradient, at optax's memory.
    {"optimiser": "muon", "learning_rate": DEFAULT_LEARNING_RATES["muon"]},
    {"optimiser": "lbfgs", "learning_rate": 1.0, "schedule": "constant", "warmup_steps": 0},
    {"optimiser": "lamb", "learning_rate": 1e-2, "epsilon": 1e-6},
    {"optimiser": "lamb", "learning_rate": 2e-2},
    {"optimiser": "lamb", "learning_rate": 5e-3},
    {"optimiser": "adam", "learning_rate": 1e-2},
    {"optimiser": "adam", "learning_rate": 1e-3},
    {"optimiser": "sgd", "learning_rate": 0.3},
    {"optimiser": "sgd", "learning_rate": 0.03},
    {"winner_seeds": [1, 2]},  # the best run so far, with these seeds
    # Then the one regulariser RESULTS.md section 10 found worth a full-scale run: a moving average of the
    # weights, which at reduced scale held validation accuracy steady where the trained weights swung from check
    # to check (as the best full-scale LAMB run did at a constant rate, 0.895 - 0.930). It does not change the
    # weights' path, so the run compares the two itself. Its horizon is one outer loop, 1 / (1 - decay) = 100
    # steps, as 0.9 was for reduced scale's 10. Last, after the blog's question: with 8 minutes of device time
    # it runs only in a longer study.
    {"optimiser": "lamb", "learning_rate": 1e-2, "ema": 0.99},
]


def build_parser():
    p = parser("study.py", __doc__)
    p.add_argument("--budget-seconds", type=float, default=480, help="device time the runs may take in all")
    p.add_argument("--seconds-per-outer", type=float, default=18.4,
                   help="estimate of one outer loop until one is measured (18.4: the H100 at 936K img/s)")
    p.add_argument("--compile-seconds", type=float, default=45, help="estimate of one new program's compile")
    p.add_argument("--pack", required=True, help="one file with every line of every run's metrics")
    p.add_argument("--variant-from", default=None, help="a bench.py --json file: use its fastest correct variant")
    p.add_argument("--output-dir", required=True, help="one folder per run (checkpoints, metrics)")
    return p


def parse_args(argv=None):
    study, fixed = build_parser().parse_known_args(argv)
    for flag in PLANNED:
        if any(a == flag or a.startswith(flag + "=") for a in fixed):
            raise UsageError(f"{flag} is set by the study's plan for each run (study.PLAN): leave it out")
    for flag in ("--budget-seconds", "--seconds-per-outer", "--compile-seconds"):
        value = getattr(study, flag[2:].replace("-", "_"))
        if not 0 < value < math.inf:
            raise UsageError(f"{flag} must be positive, got {value}")
    check_output("--pack", study.pack)
    base = parse_config(fixed + ["--output-dir", study.output_dir])
    study.variant_line = None  # said once the processes have joined: the log asks jax for the process index
    if study.variant_from:
        variant, study.variant_line = fastest_variant(study.variant_from, base.dtype)
        base = dataclasses.replace(base, **variant)
    return study, base


def fastest_variant(path: str, dtype: str) -> tuple[dict, str]:
    """The conv formulation, GELU recomputation and microbatch of the fastest row of a bench.py JSON in
    `dtype` whose logits agree with nn.Conv (to bf16's or f32's rounding), and a line saying which. Read while
    the flags are parsed, before jax.distributed starts, so it asks jax nothing (not even to log)."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--variant-from {path} is not a bench.py --json file: {error}") from None
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-4
    good = [r for r in rows if "error" not in r and r.get("dtype") == dtype and "conv" in r
            and r["logits_relative_error"] <= tolerance]
    if not good:
        raise UsageError(f"--variant-from {path}: no correct {dtype} variant in it")
    best = max(good, key=lambda r: r["images_per_second"])
    return ({"conv": best["conv"], "remat_gelu": best["remat_gelu"], "microbatch": best["microbatch"]},
            f"fastest variant in {path}: {best['name']} ({best['images_per_second']:,.0f} img/s)")


# What the plan sets for each run: given on the command line they would be silently overwritten, so refused.
PLANNED = ("--optimiser", "--learning-rate", "--schedule", "--warmup-steps", "--seed", "--weight-decay",
           "--momentum", "--epsilon", "--ema", "--lbfgs-memory")


def not_for(base: Config, entry: dict) -> str | None:
    """Why the command's fixed flags rule out a run of the plan (None: they do not): L-BFGS's own refusals
    (config.check_line_search: no drawn batch, no gradient penalty). Such a run is skipped, said, and the rest
    of the plan runs; any other bad value is refused as train.py refuses it."""
    if entry.get("optimiser") != "lbfgs":
        return None
    try:
        check_line_search(planned(base, entry))
    except UsageError as error:
        return str(error)
    return None


def planned(base: Config, entry: dict) -> Config:
    """A run of the plan: warmup and cosine decay, seed 0, no weight decay, each optimiser's default epsilon and
    momentum, no weight average unless the entry has one, LAMB's biases excluded only where the command asks it
    and the run is LAMB's."""
    total = base.inner_steps * base.outer_steps
    optimiser = entry.get("optimiser", base.optimiser)
    return dataclasses.replace(base, **{"schedule": "warmup_cosine", "warmup_steps": round(WARMUP_FRACTION * total),
                                        "seed": 0, "weight_decay": 0.0, "momentum": 0.9, "epsilon": None, "ema": 0.0,
                                        "lamb_exclude_biases": base.lamb_exclude_biases and optimiser == "lamb",
                                        **entry})


def seconds_per_outer(output_dir: str) -> float | None:
    """The median time between outer loops of a finished run (the first, with its compile, left out)."""
    ended = sweep.read_run(output_dir)
    elapsed = [r["elapsed_seconds"] for r in ended[1]] if ended else []
    return statistics.median(b - a for a, b in zip(elapsed, elapsed[1:])) if len(elapsed) > 2 else None


def best_finished(points: list[sweep.Point]) -> sweep.Point | None:
    """The point whose finished run reached the highest validation accuracy."""
    scored = [(max(r["validation_accuracy"] for r in ended[1]), point) for point in points
              if (ended := sweep.read_run(point.config.output_dir)) and ended[1] and "summary" in ended[2]]
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def run_study(study, base: Config) -> dict:
    init_distributed(base)  # before the signal handlers: jax's preemption notifier would replace them
    if study.variant_line:
        log(study.variant_line)
    started, estimate = time.monotonic(), study.seconds_per_outer
    pack = Pack(study.pack) if jax.process_index() == 0 else None
    shared, done, outcome = train.Shared(base, pack), [], {"ran": [], "skipped": []}
    # Every run of the plan checked before the first trains (the winner's copies are like it); what needs the
    # data, once a run is to train (a study of finished or skipped runs loads none).
    plan = [sweep.at_home(planned(base, entry), base.output_dir).config for entry in PLAN
            if "winner_seeds" not in entry and not not_for(base, entry)]
    checked = False
    with StopSignals() as stop:
        for entry in PLAN:
            if not_for(base, entry):
                log(f"{entry['optimiser']} lr {entry['learning_rate']:g}: skipped, {not_for(base, entry)}")
                outcome["skipped"].append(sweep.run_name(planned(base, entry)))
                continue
            if "winner_seeds" in entry:
                winner = best_finished(done)
                configs = [dataclasses.replace(winner.config, seed=s) for s in entry["winner_seeds"]] if winner else []
            else:
                configs = [planned(base, entry)]
            for config in configs:
                point = sweep.at_home(config, base.output_dir)
                if stop.agree():
                    raise Interrupted(stop.agreed, f"before {point.name}; re-running the same command goes on")
                new_program = train.program_key(point.config) not in shared.programs
                needed = point.config.outer_steps * estimate + study.compile_seconds * new_program
                left = study.budget_seconds - (time.monotonic() - started)
                if sweep.verdict_of_process_0(point.config) != sweep.RUN:
                    log(f"{point.name}: finished earlier, skipped")
                    if pack:  # this pack holds it too, whole: a pack stands alone
                        pack.add_file(point.name, os.path.join(point.config.output_dir, "metrics.jsonl"))
                elif needed > left:
                    log(f"{point.name}: skipped, needs about {needed:.0f}s of the {left:.0f}s left")
                    outcome["skipped"].append(point.name)
                    continue
                else:
                    if not checked:
                        sweep.check_programs(plan, shared, "--batch-size")
                        checked = True
                    log(f"{point.name}: about {needed:.0f}s of the {left:.0f}s left")
                    try:
                        train.run(point.config, shared, stop)
                    except Diverged as error:
                        log(f"{point.name}: diverged: {error}")
                    except (KeyboardInterrupt, Interrupted, UsageError, PeerError, DataError):
                        raise
                    except Exception as error:  # one run that fails (out of memory, say) must not end the study
                        log(f"{point.name}: crashed: {type(error).__name__}: {error}")
                        if jax.process_index() == 0:
                            sweep.record_crash(point.config, error)
                            pack.add_file(point.name, os.path.join(point.config.output_dir, "metrics.jsonl"))
                    outcome["ran"].append(point.name)
                done.append(point)
                estimate = seconds_per_outer(point.config.output_dir) or estimate
        if stop.agree():  # it came during the last run's last (compiled) outer loop
            raise Interrupted(stop.agreed, "during the last run's last outer loop, which completed the study's runs")
    outcome.update(seconds=time.monotonic() - started, budget_seconds=study.budget_seconds,
                   seconds_per_outer=estimate)
    if pack:
        pack.writer(None)({"study": outcome})
    log(f"study: ran {len(outcome['ran'])}, skipped {len(outcome['skipped'])} in {outcome['seconds']:.0f}s")
    return outcome


def main(argv=None):
    exit_on_failure("study.py", lambda: run_study(*parse_args(argv)))


if __name__ == "__main__":
    main()
