"""One list of what defines a run, and the key under which a sweep shares compiled programs; the output paths
every entry point checks."""
import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

import config
import parallel
import train
from device_data import Prepared
from errors import UsageError
from helpers import make_folder


def test_every_flag_either_defines_the_run_or_only_how_it_is_computed():
    fields = {f.name for f in dataclasses.fields(config.Config)}
    definition, computed = set(config.RUN_DEFINITION), set(config.HOW_COMPUTED)
    assert not definition & computed, "both"
    assert fields - definition - computed == set(), "neither"
    assert definition | computed == fields
    flags = {o[2:].replace("-", "_") for a in config.build_parser()._actions for o in a.option_strings
             if o.startswith("--")} - {"help"}
    assert flags == fields  # every flag is a field of the config, and the other way round


class Recording:
    """A config that notes every field read from it."""

    def __init__(self, wrapped):
        self._wrapped, self.read = wrapped, set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._wrapped, name)


@pytest.mark.parametrize("backend_choices", [dict(), dict(conv="xla", inner_loop="compiled", dtype="bfloat16")])
def test_the_program_key_covers_everything_build_programs_reads(backend_choices):
    images = np.zeros((jax.local_device_count(), 4, 8, 8, 3), np.uint8)  # (devices, per_device, 8, 8, 3)
    labels, mask = np.zeros(images.shape[:2], np.int32), np.ones(images.shape[:2], np.float32)
    batch = parallel.on_devices(images, labels, mask)
    prepared = Prepared(batch, batch, 32, 32, 1, 10, 32)
    recording = Recording(config.Config(dataset="synthetic", channels=(4,), dense=4, **backend_choices))
    train.build_programs(recording, prepared)
    assert recording.read <= set(train.PROGRAM_FIELDS), recording.read - set(train.PROGRAM_FIELDS)
    assert set(train.PROGRAM_FIELDS) <= {f.name for f in dataclasses.fields(config.Config)}


def test_an_lbfgs_run_s_programs_keep_its_number_of_curvature_pairs():
    import optax
    from optimisers import create_state
    images = np.zeros((jax.local_device_count(), 4, 8, 8, 3), np.uint8)
    batch = parallel.on_devices(images, np.zeros(images.shape[:2], np.int32), np.ones(images.shape[:2], np.float32))
    run = config.Config(dataset="synthetic", channels=(4,), dense=4, optimiser="lbfgs", lbfgs_memory=3)
    programs = train.build_programs(run, Prepared(batch, batch, 32, 32, 1, 10, 32))
    state = create_state(programs.model, programs.optimiser, 0, programs.image_shape)
    memory = optax.tree_utils.tree_get(state.opt_state, "diff_params_memory")
    assert {leaf.shape[0] for leaf in jax.tree.leaves(memory)} == {3}


def test_a_config_is_frozen_and_resolves_the_optimisers_default_rate():
    c = config.parse(["--optimiser", "sgd"])
    assert c.learning_rate == config.DEFAULT_LEARNING_RATES["sgd"] and c.channels == (32, 64, 128, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3
    assert dataclasses.replace(c, seed=3).seed == 3
    with pytest.raises(UsageError, match="--weight-decay must be >= 0, got -0.1"):
        config.check(dataclasses.replace(c, weight_decay=-0.1))


# A different value for every field of the config (a new field must be added here).
CHANGED = {"optimiser": "adam", "learning_rate": 0.5, "weight_decay": 0.1, "momentum": 0.5, "epsilon": 1e-3,
           "schedule": "warmup_linear", "warmup_steps": 2, "ema": 0.9, "label_smoothing": 0.1,
           "lamb_exclude_biases": True, "lbfgs_memory": 5, "gradient_penalty": 0.5, "penalty_block": 8,
           "inner_steps": 7,
           "outer_steps": 9, "batch_size": 64,
           "inner_loop": "compiled", "seed": 1, "dataset": "tfds", "data_dir": "elsewhere", "manual_dir": "zips",
           "synthetic_examples": 99, "image_size": 32, "train_examples": 10, "no_augment": True, "channels": (4,),
           "dense": 3, "initialiser": "haiku", "dtype": "bfloat16", "conv": "xla", "remat_gelu": True, "microbatch": 5,
           "train_eval_examples": 100,
           "target_accuracy": 0.5, "stop_at_target": True, "output_dir": "out", "resume": True, "keep_checkpoints": 5,
           "eval_test": True, "coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
           "distributed_timeout": 9}


def test_a_resume_is_refused_on_a_change_of_any_field_that_defines_the_run_and_of_no_other(tmp_path):
    import checkpoint
    assert set(CHANGED) == {f.name for f in dataclasses.fields(config.Config)}
    base = config.Config(dataset="synthetic", schedule="warmup_cosine", warmup_steps=1)  # outer_steps then counts
    saved = checkpoint.run_definition(base)
    for field, value in CHANGED.items():
        changed = checkpoint.differences(saved, dataclasses.replace(base, **{field: value}))
        if field in config.HOW_COMPUTED or field == "data_dir":  # the data folder: see below
            assert changed == [], field
        else:
            assert any(line.startswith(f"--{field.replace('_', '-')} ") for line in changed), (field, changed)
    constant = config.Config(dataset="synthetic")  # a constant rate does not depend on the run's length
    longer = dataclasses.replace(constant, outer_steps=9)
    assert checkpoint.differences(checkpoint.run_definition(constant), longer) == []
    # A data folder counts by its contents, not by its path (synthetic and TFDS data have no folder of images).
    folders = [make_folder(tmp_path / name, per_class=2) for name in ("a", "b")]
    Image.new("RGB", (8, 8)).save(folders[1] / "River" / "River_1.png")
    saved = checkpoint.run_definition(config.Config(dataset="folder", data_dir=str(folders[0])))
    assert checkpoint.differences(saved, config.Config(dataset="folder", data_dir=str(folders[0]) + "/")) == []
    assert checkpoint.differences(saved, config.Config(dataset="folder", data_dir=str(folders[1])))[0].startswith(
        "--data-dir '6 images, sha256 ")
    # A definition saved before a flag existed means what the run computed then: the whole set as the batch, one
    # initialiser, and optax's epsilon (LAMB's default has changed since, so that older run is another run now).
    older = {key: value for key, value in checkpoint.run_definition(constant).items()
             if key not in ("batch_size", "initialiser", "epsilon", "lbfgs_memory")}
    optax_epsilon = dataclasses.replace(constant, epsilon=1e-6)
    assert constant.optimiser == "lamb" and checkpoint.differences(older, optax_epsilon) == []
    assert checkpoint.differences(older, constant) == ["--epsilon 1e-06 -> 3.125e-08"]
    assert checkpoint.differences(older, dataclasses.replace(optax_epsilon, batch_size=64)) == [
        "--batch-size None -> 64"]
    assert checkpoint.differences(older, dataclasses.replace(optax_epsilon, initialiser="haiku")) == [
        "--initialiser 'flax' -> 'haiku'"]
    lbfgs = config.Config(dataset="synthetic", optimiser="lbfgs")  # before --lbfgs-memory: optax's 10 pairs
    older = {k: v for k, v in checkpoint.run_definition(lbfgs).items() if k != "lbfgs_memory"}
    assert checkpoint.differences(older, lbfgs) == []
    assert checkpoint.differences(older, dataclasses.replace(lbfgs, lbfgs_memory=5)) == ["--lbfgs-memory 10 -> 5"]


def test_the_target_counts_as_reached_at_exactly_its_accuracy():
    import checkpoint
    history = [{"outer": 1, "step": 10, "validation_accuracy": 0.9, "train_seconds": 1.0, "elapsed_seconds": 2.0},
               {"outer": 2, "step": 20, "validation_accuracy": 0.95, "train_seconds": 2.0, "elapsed_seconds": 4.0}]
    assert checkpoint.target_reached(history, 0.95) == {"outer": 2, "step": 20, "train_seconds": 2.0,
                                                        "elapsed_seconds": 4.0}
    assert checkpoint.target_reached(history, 0.96) is None


@pytest.mark.parametrize("program,argv,message", [
    ("train", ["--output-dir", "{file}/run"], "--output-dir {file}/run: {file} is not a folder"),
    ("sweep", ["--output-dir", "/proc/sweep"], "--output-dir /proc/sweep cannot be written: "),
    ("study", ["--pack", "{tmp}", "--output-dir", "{tmp}/runs"], "--pack {tmp} is a folder; give a file's path"),
    ("study", ["--pack", "/proc/p.jsonl", "--output-dir", "{tmp}/runs"], "--pack /proc/p.jsonl cannot be written: "),
    ("study", ["--pack", "{tmp}/p.jsonl", "--output-dir", "{file}"], "--output-dir {file} exists and is not a folder"),
    ("bench", ["--json", "{tmp}"], "--json {tmp} is a folder; give a file's path"),
    ("bench", ["--json", "/nonexistent/b.json"], "--json /nonexistent/b.json: its folder /nonexistent does not exist"),
    ("bench", ["--profile", "{file}"], "--profile {file} exists and is not a folder"),
    ("report", ["--out", "{tmp}"], "--out {tmp} is a folder; give a file's path"),
    ("report", ["--out", "/nonexistent/R.md"], "--out /nonexistent/R.md: its folder /nonexistent does not exist"),
    ("report", ["--events", "/proc/x"], "--events /proc/x cannot be written: "),
    ("report", ["--events", "{file}"], "--events {file} exists and is not a folder"),
])
def test_every_output_path_that_cannot_be_written_is_refused_with_one_line_before_any_work(tmp_path, capsys, program,
                                                                                           argv, message):
    """A folder given for a file, a file under a missing folder, a folder where nothing can be made: once
    tracebacks, bench.py's and study.py's only after their work had run."""
    import importlib
    (tmp_path / "file").write_text("")
    values = {"tmp": tmp_path, "file": tmp_path / "file"}
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(program).main([a.format(**values) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"{program}.py: error: " + message.format(**values)), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing made, not even a folder
