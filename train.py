"""Train the EuroSAT conv net with the whole (augmented) training set as every step's batch.

Run the same command on every host of a pod slice, or once on a single GPU/CPU box:
    python train.py --optimiser lamb

This file is the experiment: a run's compiled programs, its outer loops and what each records. The step and
the inner loops are in steps.py, flags in config.py, the optimisers in optimisers.py, the data on the devices
in device_data.py, processes and devices in parallel.py, stop signals in stopping.py, checkpoints in
checkpoint.py, the metrics file in metrics.py, the gradient noise scale in noise_scale.py.
"""
import dataclasses
import functools
import math
import os
import time
from typing import Callable, NamedTuple

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoint
import data
import steps
import noise_scale
from config import check_output
from config import parse as parse_config
from device_data import Prepared, load_split, prepare, prepare_split
from errors import BLOWN_UP_TIMES_CHANCE, Diverged, Interrupted, UsageError, diverged_loss, exit_on_failure
from metrics import MetricsLog, Pack, complete_summary, model_line, outer_line, pack_bits, provenance
from model import ConvNet, param_count
from optimisers import averaged_params, create_state, make_optimiser, rate_in_force, with_hyperparams
from parallel import AXIS, choose_conv, choose_microbatch, in_split_order, init_distributed, log, replicate
from progress import Progress
from stopping import StopSignals


# ----------------------------------------------------------------------------- the compiled programs

class Programs(NamedTuple):
    """A run's model, optimiser and pmapped functions."""
    model: ConvNet
    optimiser: optax.GradientTransformation
    inner: Callable  # (state, images, labels, mask, stop=) -> (state, loss), or None when a stop came midway
    evaluate: Callable  # (params, images, labels, mask, stride, limit) -> per device: correct per example,
    # (correct, non-finite, evaluated) counts over all devices
    inner_mode: str  # "compiled" or "python"
    microbatch: int
    image_shape: tuple  # (H, W, C)
    step_kwargs: dict  # what the step is built with (counts, chunks, draw, loss options)


# Everything build_programs reads: runs equal in these (they may differ in rate, decay, momentum, seed...)
# share one compiled program in a sweep.
PROGRAM_FIELDS = ("optimiser", "schedule", "warmup_steps", "inner_steps", "outer_steps", "channels", "dense",
                  "initialiser", "dtype", "conv", "remat_gelu", "microbatch", "inner_loop", "batch_size", "ema",
                  "label_smoothing", "lamb_exclude_biases", "lbfgs_memory", "gradient_penalty", "penalty_block")


def program_key(config) -> tuple:
    return tuple(getattr(config, field) for field in PROGRAM_FIELDS)


def build_programs(config, prepared: Prepared) -> Programs:
    inner_mode = config.inner_loop if config.inner_loop != "auto" else (
        "python" if jax.default_backend() == "cpu" else "compiled")
    image_shape = prepared.train_data[0].shape[2:]  # (H, W, C)
    model = ConvNet(config.channels, config.dense, prepared.num_classes, jnp.dtype(config.dtype),
                    choose_conv(config), config.initialiser, config.remat_gelu)
    optimiser = make_optimiser(config.optimiser, config.schedule, config.warmup_steps,
                               config.inner_steps * config.outer_steps, config.lamb_exclude_biases, config.ema,
                               config.lbfgs_memory)
    per_device_batch, per_device, group = check_program(config, prepared)
    microbatch = choose_microbatch(config, per_device, image_shape[0], group=group)
    whole_set = float(prepared.train_count * prepared.stride)
    step_kwargs = dict(example_count=float(config.batch_size or whole_set), population=whole_set,
                       microbatch=microbatch, per_device_batch=per_device_batch,
                       label_smoothing=config.label_smoothing, penalty=config.gradient_penalty,
                       penalty_block=config.penalty_block, line_search=config.optimiser == "lbfgs")
    if inner_mode == "compiled":
        loop = jax.pmap(functools.partial(steps.inner_loop, steps=config.inner_steps, **step_kwargs),
                        axis_name=AXIS, donate_argnums=0)

        def inner(state, *batch, seed, stop, on_step=None):  # one program: a stop request waits for its end
            return loop(state, *batch, np.full(jax.local_device_count(), seed, np.int32))
    else:
        step = jax.pmap(functools.partial(steps.step_agreeing_to_stop, **step_kwargs), axis_name=AXIS,
                        donate_argnums=0)
        inner = functools.partial(steps.python_inner_loop, step, config.inner_steps)
    evaluate = jax.pmap(functools.partial(steps.evaluation, apply_fn=model.apply, chunk=microbatch),
                        axis_name=AXIS, static_broadcasted_argnums=(4, 5))
    return Programs(model, optimiser, inner, evaluate, inner_mode, microbatch, image_shape, step_kwargs)


def check_program(config, prepared: Prepared, flag: str = "--batch-size") -> tuple[int, int, int]:
    """Every refusal build_programs makes, before anything is compiled (a sweep and a study call it for each of
    their runs before the first trains), and what it decides from them: each device's share of a drawn batch (0
    for the whole set), the examples a device holds per step, and the group a gradient chunk is a multiple of."""
    per_device_batch = batch_share(config.batch_size, prepared, flag)
    # A whole-set chunk holds whole images (all 8 forms): the noise estimate is then image-level. A penalty's
    # blocks lie within the chunks.
    group = 1 if per_device_batch else prepared.stride
    per_device = per_device_batch or prepared.train_data[0].shape[1]
    if config.gradient_penalty:
        check_penalty_blocks(config.penalty_block, per_device, flag)
        group = math.lcm(group, config.penalty_block)
    return per_device_batch, per_device, group


def check_penalty_blocks(block: int, per_device: int, flag: str = "--batch-size") -> None:
    """Each device's examples of a step must be whole penalty blocks: a rest would go unpenalised, silently."""
    if block > per_device:
        raise UsageError(f"--penalty-block {block} is more than the {per_device} examples a device holds per step: "
                         f"a smaller block, or a larger {flag}")
    if per_device % block:
        raise UsageError(f"--penalty-block {block} does not divide the {per_device} examples a device holds per "
                         "step: a block that divides them")


def batch_share(batch_size: int, prepared: Prepared, flag: str = "--batch-size") -> int:
    """Each device's share of a --batch-size batch (0 for the whole set): it must split evenly over the
    devices and fit every device's real examples (the last devices of a process may hold padding)."""
    if not batch_size:
        return 0
    devices, whole = jax.device_count(), prepared.train_count * prepared.stride
    if batch_size > whole:
        raise UsageError(f"{flag} {batch_size} is above the {whole:,} training examples of a step's whole set")
    check_batch_splits(batch_size, flag)
    share, fewest = batch_size // devices, prepared.train_fewest_per_device
    if share > fewest:
        raise UsageError(f"{flag} {batch_size} draws {share} examples per device, but a device holds only "
                         f"{fewest} real ones: use at most {fewest * devices}")
    return share


def check_batch_splits(batch_size: int | None, flag: str = "--batch-size") -> None:
    """A --batch-size must split evenly over the devices (checked before any data is loaded)."""
    devices = jax.device_count()
    if batch_size and batch_size % devices:
        raise UsageError(f"{flag} {batch_size} does not split over the {devices} devices: use a batch size "
                         f"that is a multiple of {devices}, or a number of devices that divides {batch_size}")


# ----------------------------------------------------------------------------- a run

class Shared:
    """What the runs of one process share: the data on the devices, loaded at the first run that needs it
    (a sweep of finished runs loads nothing), and the compiled programs by program_key."""

    def __init__(self, config, pack: Pack | None = None):
        self.config, self._prepared, self.programs, self.pack = config, None, {}, pack

    def prepared(self, eval_test: bool = False) -> Prepared:
        """The data on the devices; with eval_test, the test split too (loaded now if the first run lacked it)."""
        if self._prepared is None:
            self._prepared = prepare(self.config)
        if eval_test and self._prepared.test is None:
            split = load_split(self.config, "test", self._prepared.num_classes)
            self._prepared = self._prepared._replace(test=prepare_split(split, "test", False))
        return self._prepared

    def programs_for(self, config) -> Programs:
        if program_key(config) not in self.programs:
            self.programs[program_key(config)] = build_programs(config, self.prepared())
        return self.programs[program_key(config)]


def run(config, shared: Shared | None = None, stop: StopSignals | None = None) -> dict:
    """One training run; a sweep passes the data, the compiled programs and the stop signals it shares."""
    init_distributed(config)  # first: jax's own preemption notifier, set up there, must not replace our handler
    check_writable(config.output_dir)
    check_batch_splits(config.batch_size)
    if stop is None:
        with StopSignals() as stop:  # until the last checkpoint is written: a signal then must not kill the write
            summary = run(config, shared, stop)
            if stop.agree():  # it came during the last (compiled) outer loop, which finished the run
                raise Interrupted(stop.agreed, "during the last outer loop, which completed the run: its checkpoint "
                                               "and summary are written, nothing is left to resume")
            return summary
    shared = shared or Shared(config)
    checkpoints = checkpoint.manager(config.output_dir, config.keep_checkpoints) if config.output_dir else None
    try:
        resumed = checkpoint.resume_point(config, checkpoints)  # before loading data: refuse at once
        if not resumed and config.output_dir and jax.process_index() == 0:
            kept = checkpoint.keep_lost_metrics_aside(config.output_dir)
            if kept:
                log(f"{config.output_dir} holds the metrics of a run but no checkpoint to resume it from: they are "
                    f"kept as {os.path.basename(kept)}, and the run starts afresh")
        if resumed and checkpoint.finished(config, resumed):
            return summarise_finished(config, shared, checkpoints, resumed)
        programs = shared.programs_for(config)
        mirror = shared.pack.writer(os.path.basename(config.output_dir)) if shared.pack else None
        return outer_loops(config, shared.prepared(config.eval_test), programs, checkpoints, resumed, stop, mirror)
    finally:
        if checkpoints:
            checkpoints.close()  # waits for a save still being written


def check_writable(output_dir: str | None) -> None:
    """Refuse an --output-dir this process cannot create or write, before any data is loaded (checked again
    here, where the run starts: a sweep's later runs start long after their flags were checked), and make it."""
    if not output_dir:
        return
    check_output("--output-dir", output_dir, folder=True)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output-dir {output_dir} cannot be written: {error.strerror or error}") from None


def summarise_finished(config, shared: Shared, checkpoints, progress: dict) -> dict:
    """A finished run run again: nothing is trained (no data loaded unless --eval-test asks for the test
    accuracy); its summary is added to the metrics only if they lack it (a stop between the last
    checkpoint and the summary) or lack the test accuracy now asked for."""
    log(f"{config.output_dir}: finished earlier (outer loop {progress['outer']} of {config.outer_steps}"
        + (", target reached" if progress["outer"] < config.outer_steps else "") + "); nothing to train")
    prepared = programs = best_params = None
    if config.eval_test:
        prepared, programs = shared.prepared(eval_test=True), shared.programs_for(config)
        state = create_state(programs.model, programs.optimiser, config.seed, programs.image_shape)
        best_params = checkpoint.restore(checkpoints, state, state.params)[1]
    summary = summarise(config, prepared, programs, best_params, progress)
    if jax.process_index() == 0 and config.output_dir:
        complete_summary(os.path.join(config.output_dir, "metrics.jsonl"), summary)
    return summary


def start(config, prepared: Prepared, programs: Programs, checkpoints, resumed: dict | None, mirror=None):
    """(replicated state, best params, progress) fresh or from the checkpoint, and the metrics log to match."""
    state = create_state(programs.model, programs.optimiser, config.seed, programs.image_shape)
    state = with_hyperparams(state, config)
    per_device = batch_share(config.batch_size, prepared) or prepared.train_data[0].shape[1]
    log(model_line(config, param_count(state.params), programs.model.conv, programs.inner_mode, programs.microbatch,
                   per_device))
    if config.dtype == "bfloat16" and jax.default_backend() == "cpu":
        log("note: bfloat16 on a CPU runs about 3x slower than float32 (XLA's CPU backend computes bfloat16 dots "
            "in float32 and converts around them; PERFORMANCE.md): it is for GPUs and TPUs")
    if resumed:
        state, best_params, progress = checkpoint.restore(checkpoints, state, state.params)
        log(f"resuming after outer loop {progress['outer']} from {checkpoints.directory}")
    else:
        state = replicate(state)
        best_params, progress = state.params, checkpoint.initial_progress(config)
    header = {"config": dataclasses.asdict(config), "inner_loop": programs.inner_mode, "conv": programs.model.conv,
              "microbatch": programs.microbatch, "devices": jax.device_count(), "processes": jax.process_count(),
              "backend": jax.default_backend(), "classes": prepared.num_classes, "train_examples": prepared.train_count,
              "validation_examples": prepared.val_count,
              "examples_per_step": config.batch_size or prepared.train_count * prepared.stride,
              **provenance(), "run": progress["run"], "validation_ids": data.split_ids(config, "validation")}
    is_main = jax.process_index() == 0
    if is_main and config.output_dir:
        os.makedirs(config.output_dir, exist_ok=True)
    # A finished run's files stay as they are.
    write = is_main and config.output_dir and not checkpoint.finished(config, progress)
    metrics = MetricsLog(os.path.join(config.output_dir, "metrics.jsonl") if write else None,
                         header, progress["outer"] if resumed else None, mirror)
    return state, best_params, progress, metrics


def outer_loops(config, prepared: Prepared, programs: Programs, checkpoints, resumed, stop: StopSignals,
                mirror=None) -> dict:
    """Until the run is finished: the inner loop, evaluation and its record, the best params kept, a
    checkpoint; then the summary. A stop signal agreed by every process ends it between two steps."""
    state, best_params, progress, metrics = start(config, prepared, programs, checkpoints, resumed, mirror)
    first_outer = progress["outer"] + 1
    started = time.perf_counter() - progress["elapsed_seconds"]
    step_examples = config.batch_size or prepared.train_count * prepared.stride
    display = Progress(config, step_examples, progress["outer"] * config.inner_steps)
    with metrics:
        while not checkpoint.finished(config, progress):
            outer = progress["outer"] + 1
            if stop.agree():  # every process takes part, so all stop before the same outer loop
                raise Interrupted.during_run(stop.agreed, outer, progress["outer"], config.output_dir)
            tick = time.perf_counter()
            display.begin_outer(outer)
            done = programs.inner(state, *prepared.train_data, seed=config.seed, stop=stop, on_step=display.step)
            if done is None:  # a stop signal came mid-loop: its steps are dropped, the checkpoint stands
                raise Interrupted.during_run(stop.agreed, outer, progress["outer"], config.output_dir,
                                             stop.steps_done, config.inner_steps)
            state, loss, statistics = done
            record, evaluated = evaluate(config, prepared, programs, state, float(loss[0]), tick, progress, metrics)
            display.outer_done(record["inner_seconds"], outer - first_outer + 1)
            record.update(optimiser_record(config, outer, statistics), elapsed_seconds=time.perf_counter() - started,
                          **noise_scale.record_fields(statistics["sums"][0][:2], config.inner_steps,
                                                      prepared.stride, prepared.train_count),
                          **line_search_record(config, statistics))
            best_params = keep_best(config, record, evaluated, best_params, progress)
            log(outer_line(config.outer_steps, record, progress["best"], first=outer == first_outer))
            metrics.write(record)  # before the checkpoint: a resume may redo a line, never lose one
            if record.get("line_search_failures"):
                stuck_line_search(config, record, metrics)
            progress["history"].append({k: record[k] for k in ("outer", "step", "validation_accuracy",
                                                               "train_seconds", "elapsed_seconds")})
            progress.update(outer=outer, loss=record["loss"], train_seconds=record["train_seconds"],
                            elapsed_seconds=record["elapsed_seconds"])
            finished = checkpoint.finished(config, progress)
            if finished:
                metrics.draw_curves()  # complete before the last checkpoint: a finished run is not trained again
            if checkpoints:
                checkpoint.save(checkpoints, state, best_params, progress, record["validation_accuracy"])
            if config.stop_at_target and finished and outer < config.outer_steps:
                log(f"stopping: reached --target-accuracy {config.target_accuracy}")
        summary = summarise(config, prepared, programs, best_params, progress)
        metrics.write({"summary": summary})
        return summary


def evaluate(config, prepared: Prepared, programs: Programs, state, loss: float, tick: float, progress: dict,
             metrics: MetricsLog) -> tuple[dict, object]:
    """The outer loop's record (loss, train and validation accuracy, speed) and the params it is of; Diverged
    if the loss or the logits are no longer finite, or the loss blew up (errors.diverged_loss; recorded as
    such, and never kept as the best). With
    --ema both the params and their moving average are evaluated, and the better on validation is the outer
    loop's (both accuracies are in the record)."""
    inner_seconds = time.perf_counter() - tick  # the loss above waited for the inner loop
    outer = progress["outer"] + 1
    candidates = {"raw": state.params, "ema": averaged_params(state)}
    scores = {name: accuracies(config, prepared, programs, params) for name, params in candidates.items()
              if params is not None}
    blown_up = math.isfinite(loss) and diverged_loss(loss, prepared.num_classes)
    if not math.isfinite(loss) or blown_up or any(score["broken"] for score in scores.values()):
        metrics.write({"outer": outer, "diverged": True, "loss": loss if math.isfinite(loss) else str(loss)})
        best = progress["best"]
        what = (f"loss {loss:.4g} is above {BLOWN_UP_TIMES_CHANCE} times the chance loss ln({prepared.num_classes})"
                if blown_up else f"loss is {loss}" if not math.isfinite(loss) else "logits are not finite")
        raise Diverged(f"{what} after outer loop {outer} (step {outer * config.inner_steps}); "
                       f"{'loss before it' if blown_up else 'last finite loss'} {progress['loss']}; "
                       + (f"best validation accuracy {best['validation_accuracy']:.4f} at outer {best['outer']} "
                          "(kept)" if best["outer"] else "no validation before it"))
    chosen = max(scores, key=lambda name: (scores[name]["validation_correct"], name == "raw"))  # a tie: raw
    score, step_examples = scores[chosen], config.batch_size or prepared.train_count * prepared.stride
    record = {"outer": outer, "step": outer * config.inner_steps, "examples_seen": outer * config.inner_steps
              * step_examples, "loss": loss, "train_accuracy": score["train_correct"] / score["train_evaluated"],
              "validation_accuracy": score["validation_correct"] / prepared.val_count, "inner_seconds": inner_seconds,
              "images_per_second": step_examples * config.inner_steps / inner_seconds,
              "train_seconds": progress["train_seconds"] + inner_seconds,
              # Which validation images (in the split's order, the header's validation_ids) were right.
              "validation_correct": pack_bits(in_split_order(score["each"], prepared.val_local_count))}
    if config.ema:
        record.update(params=chosen, **{f"{name}_validation_accuracy": scores[name]["validation_correct"]
                                        / prepared.val_count for name in scores})
    return record, candidates[chosen]


def accuracies(config, prepared: Prepared, programs: Programs, params) -> dict:
    """Which validation images `params` classify right, and the counts on validation and on (the first
    --train-eval-examples of) the un-augmented training images, with the non-finite logits of each."""
    val_each, val_counts = programs.evaluate(params, *prepared.val_data, 1, None)
    val_correct, val_broken, _ = map(int, val_counts[0])
    per_device = -(-config.train_eval_examples // jax.device_count()) if config.train_eval_examples else None
    train_counts = programs.evaluate(params, *prepared.train_data, prepared.stride, per_device)[1][0]
    train_correct, train_broken, train_evaluated = map(int, train_counts)
    return {"each": val_each, "validation_correct": val_correct, "train_correct": train_correct,
            "train_evaluated": train_evaluated, "broken": val_broken + train_broken}


def optimiser_record(config, outer: int, statistics: dict) -> dict:
    """The last update of an outer loop: the learning rate in force, the norms, each array's update ratio."""
    statistics = jax.device_get(jax.tree.map(lambda x: x[0], statistics))  # the same on every device
    ratios = {jax.tree_util.keystr(path, simple=True, separator="/"): float(value)
              for path, value in jax.tree_util.tree_leaves_with_path(statistics["update_ratios"])}
    return {"learning_rate": rate_in_force(config, outer * config.inner_steps - 1),
            "gradient_norm": float(statistics["gradient_norm"]), "update_norm": float(statistics["update_norm"]),
            "parameter_norm": float(statistics["parameter_norm"]),
            "update_ratios": {k: v if math.isfinite(v) else None for k, v in ratios.items()}}


def stuck_line_search(config, record: dict, metrics: MetricsLog) -> None:
    """A line search that found no sufficient decrease ends the run as divergence does: its steps after one went
    nowhere when measured (no update, the same loss). The outer loop is not checkpointed, so a resume redoes it
    and stops again, and a sweep or report reads the run as diverged."""
    metrics.write({"outer": record["outer"], "diverged": True, "line_search_failures": record["line_search_failures"]})
    raise Diverged(f"L-BFGS's line search found no sufficient decrease in {record['line_search_failures']} of the "
                   f"{config.inner_steps} steps of outer loop {record['outer']} (to step {record['step']}): the loss "
                   "no longer decreases along its direction (converged to float precision, or a step that went wrong "
                   "leaves it stuck); the checkpoint before it and the best params stand")


def line_search_record(config, statistics) -> dict:
    """L-BFGS's outer loop: the loss evaluations its steps made (one each, plus their line searches'), and how
    many of its line searches found no sufficient decrease (one stops the run: its steps after it went nowhere
    when measured, so it is not a hiccup to train through)."""
    if config.optimiser != "lbfgs":
        return {}
    total = np.asarray(jax.device_get(statistics["sums"][0]))
    return {"evaluations": int(total[2]), "line_search_failures": int(total[3])}


def keep_best(config, record: dict, params, best_params, progress: dict):
    """The best params so far (a copy, with best_params.msgpack), updated when validation accuracy improves;
    with --ema, the best says which params they are (raw or their average)."""
    if record["validation_accuracy"] > progress["best"]["validation_accuracy"]:
        progress["best"] = {"validation_accuracy": record["validation_accuracy"], "outer": record["outer"],
                            "step": record["step"], **({"params": record["params"]} if "params" in record else {})}
        best_params = jax.tree.map(jnp.copy, params)  # the state's own buffers are donated
        if jax.process_index() == 0 and config.output_dir:
            checkpoint.write_params(os.path.join(config.output_dir, "best_params.msgpack"),
                                    jax.device_get(flax.jax_utils.unreplicate(best_params)))
    record["best_validation_accuracy"] = progress["best"]["validation_accuracy"]
    return best_params


def summarise(config, prepared: Prepared | None, programs: Programs | None, best_params, progress: dict) -> dict:
    best, target = progress["best"], checkpoint.target_reached(progress["history"], config.target_accuracy)
    summary = {"best": best, "target": target, "target_accuracy": config.target_accuracy,
               "final_loss": progress["loss"], "train_seconds": progress["train_seconds"]}
    if target:
        log(f"reached validation accuracy {config.target_accuracy} at outer {target['outer']} (step "
            f"{target['step']}) after {target['train_seconds']:.1f}s of training")
    else:
        log(f"did not reach validation accuracy {config.target_accuracy}; best {best['validation_accuracy']:.4f}")
    if config.eval_test:
        test_data, test_count = prepared.test
        summary["test_accuracy"] = int(programs.evaluate(best_params, *test_data, 1, None)[1][0][0]) / test_count
        which = ", their moving average" if best.get("params") == "ema" else ""
        log(f"test accuracy of the best params (outer {best['outer']}{which}): {summary['test_accuracy']:.4f}")
    return summary


def main(argv=None) -> None:
    exit_on_failure("train.py", lambda: run(parse_config(argv, __doc__)))


if __name__ == "__main__":
    main()
