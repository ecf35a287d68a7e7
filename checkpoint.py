"""Checkpoints of a training run (orbax): one per outer loop, the last K and the best kept; the progress
record they carry; and the decision whether a checkpoint resumes this run.

A checkpoint holds everything the run's future depends on: the train state (params, optimiser state with
its step count and injected hyperparameters), the best params so far, the progress record and the part
of the config that defines the run. Training has no random state after initialisation (every step is the
whole batch, there is no dropout), so resuming from one replays the uninterrupted run exactly.
"""
import json
import os
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

import data
import metrics
from config import RUN_DEFINITION, defaults_before
from errors import UsageError
from parallel import replicate


def run_definition(config) -> dict:
    """The values of config.RUN_DEFINITION that a resume must match."""
    definition = {key: getattr(config, key) for key in RUN_DEFINITION}
    definition["channels"] = list(definition["channels"])
    if config.schedule == "constant":  # a constant rate does not depend on the run's length: it may be extended
        del definition["outer_steps"]
    # A data folder is its contents, wherever it lies; other sources are named by the other flags.
    definition["data_dir"] = data.folder_identity(config.data_dir) if config.dataset == "folder" else None
    return definition


def differences(saved: dict, config) -> list[str]:
    """The flags whose values differ from those a checkpoint was written with, as readable strings."""
    current = run_definition(config)
    saved = {**{key: value for key, value in defaults_before(saved).items() if key in current}, **saved}
    unrecorded = "(not recorded)"  # a definition written before this part of it was
    return [f"--{key.replace('_', '-')} {saved.get(key, unrecorded)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key, unrecorded) != current.get(key)]


def refuse_other_run(saved_definition: dict, config, what: str = "a checkpoint") -> None:
    """UsageError naming each flag in which `config` defines another run than the one saved."""
    changed = differences(saved_definition, config)
    if changed:
        raise UsageError(f"{config.output_dir} holds {what} of a different run ({'; '.join(changed)}); "
                         "use another --output-dir, or delete that one to start over")


# ----------------------------------------------------------------------------- progress

def initial_progress(config) -> dict:
    """The progress record a checkpoint carries: outer loops done, the best so far, every outer loop's
    validation accuracy (for the target), the last loss, seconds, and the run's definition; with --batch-size,
    the device count its batches were drawn over (each device draws from its own examples)."""
    return {"outer": 0, "best": {"validation_accuracy": -1.0, "outer": None, "step": None}, "history": [],
            "loss": None, "train_seconds": 0.0, "elapsed_seconds": 0.0, "run": run_definition(config),
            "draw_layout": draw_layout() if config.batch_size else None}


def draw_layout() -> list[int]:
    """What a --batch-size run's draws depend on besides the seed: how the examples lie over the processes
    and devices (each device draws from its own)."""
    return [jax.process_count(), jax.device_count()]


def target_reached(history: list[dict], target_accuracy: float) -> dict | None:
    """The first outer loop whose validation accuracy reached the target, recomputed from the records
    (the target is a reporting setting: a resumed run may ask for another)."""
    return next(({k: h[k] for k in ("outer", "step", "train_seconds", "elapsed_seconds")} for h in history
                 if h["validation_accuracy"] >= target_accuracy), None)


def finished(config, progress: dict) -> bool:
    """Whether the run has nothing left to do: all its outer loops, or the target with --stop-at-target."""
    return progress["outer"] >= config.outer_steps or bool(
        config.stop_at_target and target_reached(progress["history"], config.target_accuracy))


def resume_point(config, checkpoints) -> dict | None:
    """The latest checkpoint's progress if this run continues it; refuses a checkpoint of another run."""
    progress = read_progress(checkpoints) if checkpoints else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.int64(progress["outer"] if progress else -1),
                                     f"processes see different checkpoints in {config.output_dir}: "
                                     "--output-dir must be a folder every host reads and writes")
    if progress is None:
        if config.resume:
            raise UsageError(f"--resume: no checkpoint in {config.output_dir}")
        return None
    refuse_other_run(progress["run"], config)
    if config.batch_size and not finished(config, progress):
        refuse_other_layout(config, progress)
    return progress


def refuse_other_layout(config, progress: dict) -> None:
    """A --batch-size run resumes only on the layout its batches were drawn over: its checkpoint's record of it,
    or for a checkpoint written before that was recorded, the process and device counts of its metrics header
    (the run's start); refused when neither tells it."""
    draws = f"--batch-size {config.batch_size} draws each device's share from that device's own examples, so this " \
            "run's batches depend on its layout"
    layout = progress.get("draw_layout") or header_layout(config.output_dir)
    if layout is None:
        raise UsageError(f"{config.output_dir}: {draws}, and neither its checkpoint (written before the layout was "
                         "recorded) nor a metrics.jsonl header there says what it was: start it afresh in another "
                         "--output-dir")
    if layout != draw_layout():
        raise UsageError(f"{config.output_dir}: {draws}, {layout[0]} process(es) x {layout[1]} devices in all, and "
                         f"this one is {draw_layout()[0]} x {draw_layout()[1]}: resume it on its own layout, or start "
                         "it afresh in another --output-dir")


def header_layout(output_dir: str) -> list[int] | None:
    """[processes, devices] from the header of the metrics.jsonl in `output_dir` (the layout a run started on),
    or None where there is no such header, or it lacks either count."""
    try:
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or "processes" not in header or "devices" not in header:
        return None
    return [header["processes"], header["devices"]]


# ----------------------------------------------------------------------------- files

def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """Saves in the background and atomically (a checkpoint appears only once complete)."""
    accuracy = lambda metrics: metrics["validation_accuracy"]  # noqa: E731
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep),
                                                            ocp.checkpoint_managers.BestN(get_metric_fn=accuracy, n=1)])
    # best_fn as well, or orbax neither writes the metrics nor reads them back after a restart.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=accuracy,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, "checkpoints")), options=options)


def host_tree(state, best_params) -> dict:
    """This host's copy of the replicated state and best params, as a tree of NumPy arrays."""
    unreplicated = jax.device_get(flax.jax_utils.unreplicate((state, best_params)))
    return {"state": flax.serialization.to_state_dict(unreplicated[0]), "best_params": unreplicated[1]}


def save(checkpoints: ocp.CheckpointManager, state, best_params, progress: dict, validation_accuracy: float):
    """Checkpoint after outer loop progress["outer"]; returns once the arrays are on the host, and the
    write goes on in the background (the next save, or close, waits for it)."""
    checkpoints.save(progress["outer"],
                     args=ocp.args.Composite(tree=ocp.args.StandardSave(host_tree(state, best_params)),
                                             progress=ocp.args.JsonSave(progress)),
                     metrics={"validation_accuracy": validation_accuracy})


def restore(checkpoints: ocp.CheckpointManager, template_state, template_params):
    """(state, best params, progress) of the latest checkpoint, state and params replicated on the devices."""
    outer = checkpoints.latest_step()
    template = jax.tree.map(np.asarray, {"state": flax.serialization.to_state_dict(template_state),
                                         "best_params": template_params})
    restored = checkpoints.restore(outer, args=ocp.args.Composite(tree=ocp.args.StandardRestore(template),
                                                                  progress=ocp.args.JsonRestore()))
    state = flax.serialization.from_state_dict(template_state, restored.tree["state"])
    replicated = replicate((state, restored.tree["best_params"]))
    return replicated[0], replicated[1], upgraded(restored.progress)


def read_progress(checkpoints: ocp.CheckpointManager) -> dict | None:
    """The latest checkpoint's progress record (with its run definition), without reading arrays."""
    outer = checkpoints.latest_step()
    if outer is None:
        return None
    return upgraded(checkpoints.restore(outer, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress)


def keep_lost_metrics_aside(output_dir: str) -> str | None:
    """A folder whose metrics.jsonl holds a run's outer loops but no checkpoint (deleted, never kept, or a kill
    between an outer loop's record and its first checkpoint): the run starts afresh, and the old file is kept
    as metrics.jsonl.<UTC time>.old rather than started over. The TensorBoard event files that mirror it go
    with it, into the folder events.<UTC time>.old: TensorBoard reads every event file of a run's folder, so
    left there they showed every step twice, the old run's beside the new one's (in a folder of their own they
    are a run of their own). Returns the kept file's name, if any."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        outer = sum("validation_accuracy" in json.loads(line) for line in f if line.strip())
    if not outer:
        return None
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    kept = f"{path}.{stamp}.old"
    os.replace(path, kept)
    events = metrics.event_files(output_dir)
    if events:
        aside = os.path.join(output_dir, f"events.{stamp}.old")
        os.makedirs(aside, exist_ok=True)
        for name in events:
            os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return kept


def upgraded(progress: dict) -> dict:
    """A progress record of an older checkpoint in today's form (it had no per-outer-loop history)."""
    progress.setdefault("history", [])
    progress.pop("target", None)
    return progress


def write_params(path: str, params) -> None:
    """flax-serialised params, written atomically: a crash mid-write leaves the previous file whole."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    os.replace(temporary, path)
