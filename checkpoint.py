"""Checkpoints of a training run (orbax): one per outer loop, the last K and the best kept.

A checkpoint holds everything the run's future depends on: the train state (params, optimiser state with
its step count and injected hyperparameters), the best params so far, the progress counters and the part
of the config that defines the run. Training has no random state after initialisation (every step is the
whole batch, there is no dropout), so resuming from one replays the uninterrupted run exactly.
"""
import os

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

import data

# Flags that change what a run computes. Everything else (device count, conv formulation, microbatch,
# inner-loop mode, output paths) only changes how it is computed, so a run may resume on other hardware.
RUN_DEFINITION = ("optimiser", "learning_rate", "weight_decay", "momentum", "schedule", "warmup_steps",
                  "inner_steps", "seed", "dataset", "synthetic_examples", "image_size", "train_examples",
                  "no_augment", "channels", "dense", "dtype")


# Parts of the definition that are not flags, by how a message names them.
NOT_FLAGS = {"data_files": "the images in --data-dir"}


def run_definition(args) -> dict:
    definition = {key: getattr(args, key) for key in RUN_DEFINITION}
    definition["channels"] = list(definition["channels"])
    if args.schedule != "constant":  # the schedule's shape depends on the run's length; a constant one does not
        definition["outer_steps"] = args.outer_steps
    if args.dataset == "folder":  # the folder's contents are the data, wherever the folder lies
        definition["data_files"] = data.folder_identity(args.data_dir)
    return definition


def differences(saved: dict, args) -> list[str]:
    """The flags whose values differ from those a checkpoint was written with, as readable strings."""
    current = run_definition(args)
    return [f"{NOT_FLAGS.get(key) or '--' + key.replace('_', '-')} {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


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
    replicated = flax.jax_utils.replicate((state, restored.tree["best_params"]))
    return replicated[0], replicated[1], restored.progress


def read_progress(checkpoints: ocp.CheckpointManager) -> dict | None:
    """The latest checkpoint's progress record (with its run definition), without reading arrays."""
    outer = checkpoints.latest_step()
    if outer is None:
        return None
    return checkpoints.restore(outer, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress
