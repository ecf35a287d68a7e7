import functools
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

import config
import data
import device_data
import optimisers
import parallel
import steps
import train
from conftest import ROOT
from helpers import SMALL, device_env, latest_checkpoint, make_images, read_metrics, run_train
from metrics import unpack_bits
from model import ConvNet


def small_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    split = data.Split(rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32))
    model = ConvNet(channels=(4, 8), dense=8)
    return split, model, model.init(jax.random.PRNGKey(seed), split.images[:1])["params"]


def reference_loss_grads_correct(model, params, split):
    def mean_loss(p, images, labels):
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    # Compiled whole (op by op, each of its hundred-odd operations compiled alone took seconds in all).
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params, split.images, split.labels)
    logits = jax.jit(model.apply)({"params": params}, split.images)
    correct = int((np.argmax(logits, -1) == split.labels).sum())
    return loss, grads, correct


@pytest.mark.parametrize("microbatch", [0, 1, 3])
def test_padded_sharded_step_equals_the_unpadded_single_device_computation(microbatch):
    split, model, params = small_problem(13)  # 13 examples over 8 devices: 3 padding slots
    loss, grads, correct = reference_loss_grads_correct(model, params, split)
    state = flax.jax_utils.replicate(optimisers.create_state(model, optax.sgd(1.0), 0, (8, 8, 3)))
    state = state.replace(params=flax.jax_utils.replicate(params))
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 2))  # (8, 2, ...)
    step = jax.pmap(functools.partial(steps.train_step, example_count=13.0, population=13.0, microbatch=microbatch),
                    axis_name=parallel.AXIS)
    new_state, step_loss = step(state, *batch)
    np.testing.assert_allclose(np.asarray(step_loss), float(loss), rtol=1e-5)  # same on every device
    # Plain SGD with rate 1: new = old - grad, so the applied gradient is old - new.
    applied = jax.tree.map(lambda old, new: old - new[0], params, new_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), applied, grads)
    evaluate = jax.pmap(functools.partial(steps.evaluation, apply_fn=model.apply, chunk=microbatch),
                        axis_name=parallel.AXIS, static_broadcasted_argnums=(4, 5))
    each, counts = evaluate(state.params, *batch, 1, None)
    assert counts[0].tolist() == [correct, 0, 13]
    predictions = np.argmax(np.asarray(model.apply({"params": params}, split.images)), -1)
    np.testing.assert_array_equal(parallel.in_split_order(each, 13), predictions == split.labels)


def test_the_step_train_py_builds_moves_by_the_mean_gradient_over_all_eight_forms_of_every_image():
    """build_programs' own example count and the forms made on the devices: one SGD step (rate 1, no
    momentum, gradient chunks smaller than a device's share) moves the params by the mean gradient over
    the 8 dihedral forms of the 13 real images, made here with np.rot90 and np.fliplr."""
    split, model, params = small_problem(13)
    train_data, count = device_data.prepare_split(split, "train", augmented=True)  # (8, 16, 8, 8, 3): padded
    prepared = device_data.Prepared(train_data, train_data, count, count, 8, 10, count)
    c = config.Config(optimiser="sgd", learning_rate=1.0, momentum=0.0, channels=(4, 8), dense=8, inner_steps=1,
                      outer_steps=1, inner_loop="python", microbatch=5, dataset="synthetic")
    programs = train.build_programs(c, prepared)
    assert programs.step_kwargs["example_count"] == programs.step_kwargs["population"] == 104  # forms, not images
    state = optimisers.with_hyperparams(optimisers.create_state(programs.model, programs.optimiser, 0, (8, 8, 3)), c)
    state = flax.jax_utils.replicate(state.replace(params=params))
    no_signal = SimpleNamespace(received=None, flags=lambda: np.zeros(jax.local_device_count(), np.int32))
    new_state, loss, statistics = programs.inner(state, *train_data, seed=0, stop=no_signal)
    forms = np.stack([np.rot90(np.fliplr(image) if t >= 4 else image, k=t % 4)
                      for image in split.images for t in range(8)])  # (104, 8, 8, 3)
    augmented = data.Split(forms, np.repeat(split.labels, 8))
    want_loss, want_grads, _ = reference_loss_grads_correct(model, params, augmented)
    np.testing.assert_allclose(float(loss[0]), float(want_loss), rtol=1e-5)
    applied = jax.tree.map(lambda old, new: old - new[0], params, new_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), applied, want_grads)
    # What the optimiser did, as the step reports it: SGD at rate 1 moves by the gradient itself.
    def norm(tree):
        return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(statistics["gradient_norm"][0], norm(want_grads), rtol=1e-4)
    np.testing.assert_allclose(statistics["update_norm"][0], norm(want_grads), rtol=1e-4)
    np.testing.assert_allclose(statistics["parameter_norm"][0], norm(jax.tree.map(lambda p: p[0], new_state.params)),
                               rtol=1e-5)
    want_ratios = jax.tree.map(lambda g, p: norm(g) / norm(p) if norm(p) else np.nan, want_grads, params)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got[0], want, rtol=1e-4), statistics["update_ratios"],
                 want_ratios)


def test_what_the_optimiser_did_is_reported_from_its_update_not_its_gradient():
    """Adam's update is not its gradient (SGD at rate 1's is): the reported norms and per-array ratios are
    those of the params' change, recomputed here from the params before and after, against optax's own
    adamw for the update itself."""
    split, model, params = small_problem(16)
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 2))
    prepared = device_data.Prepared(batch, batch, 16, 16, 1, 10, 16)
    c = config.Config(optimiser="adam", learning_rate=0.01, channels=(4, 8), dense=8, inner_steps=1, outer_steps=1,
                      inner_loop="python", microbatch=1, dataset="synthetic", no_augment=True)
    programs = train.build_programs(c, prepared)
    state = optimisers.with_hyperparams(optimisers.create_state(programs.model, programs.optimiser, 0, (8, 8, 3)), c)
    state = flax.jax_utils.replicate(state.replace(params=params))
    no_signal = SimpleNamespace(received=None, flags=lambda: np.zeros(jax.local_device_count(), np.int32))
    new_state, _, statistics = programs.inner(state, *batch, seed=0, stop=no_signal)
    new_params = jax.tree.map(lambda p: np.asarray(p[0], np.float64), new_state.params)
    grads = reference_loss_grads_correct(model, params, split)[1]
    plain = optax.adamw(0.01, eps=config.DEFAULT_EPSILONS["adam"], weight_decay=0.0)
    updates = plain.update(grads, plain.init(params), params)[0]
    jax.tree.map(lambda new, old, u: np.testing.assert_allclose(new - old, u, rtol=1e-4, atol=1e-7), new_params,
                 params, updates)

    def norm(tree):
        return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    change = jax.tree.map(lambda new, old: new - np.asarray(old, np.float64), new_params, params)
    np.testing.assert_allclose(statistics["update_norm"][0], norm(change), rtol=1e-4)
    np.testing.assert_allclose(statistics["gradient_norm"][0], norm(grads), rtol=1e-4)
    assert abs(norm(change) - norm(grads)) > 0.1 * norm(grads)  # here the two differ: the check could fail
    np.testing.assert_allclose(statistics["parameter_norm"][0], norm(new_params), rtol=1e-5)
    want = jax.tree.map(lambda u, p: norm(u) / norm(p) if norm(p) else np.nan, change, params)
    jax.tree.map(lambda got, w: np.testing.assert_allclose(got[0], w, rtol=1e-4), statistics["update_ratios"], want)


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 9])
def test_summing_over_chunks_equals_summing_at_once(chunk):
    values = jnp.arange(9.0 * 2).reshape(9, 2)
    weights = jnp.arange(9.0)

    def sums(v, w):
        return {"weighted": jnp.sum(v * w[:, None], 0), "count": jnp.sum(w > 3)}
    got = steps.summed_over_chunks(sums, (values, weights), chunk)
    np.testing.assert_allclose(got["weighted"], np.sum(np.asarray(values) * np.arange(9.0)[:, None], 0))
    assert int(got["count"]) == 5


def accuracy(model, params, split) -> float:
    """Recounted here, from params and images alone."""
    predictions = np.argmax(np.asarray(model.apply({"params": params}, split.images)), -1)
    return float((predictions == split.labels).sum() / len(predictions))


def test_end_to_end_synthetic_run_learns_and_writes_metrics_and_params(tmp_path, capsys):
    out = tmp_path / "run"
    command = [*SMALL, "--synthetic-examples", "500", "--inner-steps", "10", "--outer-steps", "5", "--optimiser",
               "adam", "--learning-rate", "0.05", "--output-dir", str(out), "--eval-test"]
    result = run_train(command)  # train.py as a command, in a process of its own
    header, records, summary = read_metrics(out)
    assert header["train_examples"] == 400 and header["validation_examples"] == 50
    assert header["examples_per_step"] == 3200 and header["devices"] == 8
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    assert summary["best"]["validation_accuracy"] >= 0.5  # chance is 0.1
    assert records[-1]["loss"] < records[0]["loss"]
    assert result.stdout.count("\nouter ") + result.stdout.startswith("outer ") == 5
    assert "\nspeed: " in result.stdout and "the whole run of 50 steps about" in result.stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert header["flax"] == flax.__version__ and header["optax"] == optax.__version__ and header["device_kind"]
    assert re.fullmatch("[0-9a-f]{40}", header["git_commit"] or "0" * 40)
    assert [r["learning_rate"] for r in records] == [0.05] * 5 and all(r["update_norm"] > 0 for r in records)
    for r in records:  # the noise scale in training images, and the set's 400 images over it
        assert r["b_simple"] == r["noise_trace"] / r["gradient_square"] / 8 > 0
        assert r["set_over_b_simple"] == 400 / r["b_simple"]
        b = r["b_simple"]
        assert f"B_simple {f'{b:,.0f}' if b >= 10 else f'{b:.2g}'} img (set/B {400 / b:,.1f})" in result.stdout
    for r in records:  # the whole augmented set each step
        assert r["images_per_second"] == 3200 * 10 / r["inner_seconds"] and r["examples_seen"] == 3200 * r["step"]
    # Validation accuracy falls at the end, so the best params are not the last ones.
    assert summary["best"]["outer"] < 5 and records[-1]["validation_accuracy"] < summary["best"]["validation_accuracy"]
    model = ConvNet(channels=(8, 16), dense=16, conv=header["conv"])  # the run's formulation: its rounding
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))["params"]
    best_params = flax.serialization.from_bytes(template, (out / "best_params.msgpack").read_bytes())
    last_params = latest_checkpoint(out)[1]["state"]["params"]
    splits = {name: data.load_synthetic(name, 500, 16, 0, 1) for name in data.SPLITS}
    # Every accuracy reported, recounted from the params: validation and test from the best params
    # (the test split, not the validation split), train accuracy (the original images, not their 8
    # forms) from the last outer loop's.
    assert accuracy(model, best_params, splits["validation"]) == summary["best"]["validation_accuracy"]
    assert accuracy(model, last_params, splits["validation"]) == records[-1]["validation_accuracy"]
    assert accuracy(model, best_params, splits["test"]) == summary["test_accuracy"]
    assert accuracy(model, last_params, splits["train"]) == records[-1]["train_accuracy"]
    assert accuracy(model, best_params, splits["test"]) != accuracy(model, best_params, splits["validation"])
    # The per-image record of the best outer loop names the same images, in the split's order.
    best = next(r for r in records if r["outer"] == summary["best"]["outer"])
    predictions = np.argmax(np.asarray(model.apply({"params": best_params}, splits["validation"].images)), -1)
    np.testing.assert_array_equal(unpack_bits(best["validation_correct"], 50),
                                  predictions == splits["validation"].labels)
    assert header["validation_ids"] == [f"synthetic/{i}" for i in range(400, 450)]
    # Run again (here, in this process), finished: nothing is trained or written, and the test accuracy is again
    # the best params'.
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    train.main(command)
    again = capsys.readouterr().out
    assert "finished earlier" in again and (out / "metrics.jsonl").read_text() == before
    assert f"test accuracy of the best params (outer {summary['best']['outer']}): {summary['test_accuracy']:.4f}" \
        in again


def test_compiled_and_python_inner_loops_agree(tmp_path):
    losses = {}
    for mode in ("compiled", "python"):
        train.main([*SMALL, "--synthetic-examples", "300", "--inner-steps", "3", "--outer-steps", "2",
                    "--inner-loop", mode, "--output-dir", str(tmp_path / mode)])
        losses[mode] = [[r[key] for key in ("loss", "noise_trace", "gradient_square")]
                        for r in read_metrics(tmp_path / mode)[1]]
    np.testing.assert_allclose(losses["compiled"], losses["python"], rtol=1e-4)  # the noise summed over both steps


def test_training_is_the_same_on_one_and_on_eight_devices(tmp_path):
    """4 updates of a 101-example batch (8 devices: padded), by LAMB and by Adam with the 8 dihedral forms
    made on the devices (1 device, 808 images; 8 devices, 13 images each, 808 of 832 real): on one device in a
    fresh process, on eight in this one. (The optimisers see only the summed gradient: SGD's update is checked
    against optax, not here.)
    The gradient chunks are the same partition on both layouts (an example each; an image's 8 forms each),
    so the noise scale is the same too."""
    runs = {"lamb": ["--optimiser", "lamb", "--no-augment", "--microbatch", "1"],
            "augmented": ["--optimiser", "adam", "--microbatch", "8"]}
    script = (
        "import json, os, sys, train\n"
        "for name, flags in json.loads(os.environ['RUNS']).items():\n"
        "    train.main(sys.argv[1:] + flags + ['--output-dir', os.environ['OUT'] + name])\n")
    args = [*SMALL, "--synthetic-examples", "126", "--inner-steps", "2", "--outer-steps", "2",
            "--inner-loop", "compiled", "--learning-rate", "0.05"]
    outputs = {devices: str(tmp_path / f"d{devices}-") for devices in (1, 8)}
    subprocess.run([sys.executable, "-c", script, *args], env=device_env(1, OUT=outputs[1], RUNS=json.dumps(runs)),
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    for name, flags in runs.items():
        train.main([*args, *flags, "--output-dir", outputs[8] + name])
    for name in runs:
        one, eight = (read_metrics(outputs[d] + name) for d in (1, 8))
        assert one[0]["devices"] == 1 and eight[0]["devices"] == 8
        assert one[0]["train_examples"] == eight[0]["train_examples"] == 101
        assert one[0]["examples_per_step"] == eight[0]["examples_per_step"] == (808 if name == "augmented" else 101)
        np.testing.assert_allclose([r["loss"] for r in one[1]], [r["loss"] for r in eight[1]], rtol=1e-5)
        for key in ("train_accuracy", "validation_accuracy", "validation_correct", "learning_rate"):
            assert [r[key] for r in one[1]] == [r[key] for r in eight[1]], (name, key)
        for key in ("gradient_norm", "update_norm", "parameter_norm", "noise_trace", "gradient_square", "b_simple"):
            np.testing.assert_allclose([r[key] for r in one[1]], [r[key] for r in eight[1]], rtol=1e-4)
        for a, b in zip(one[1], eight[1]):
            np.testing.assert_allclose(list(a["update_ratios"].values()), list(b["update_ratios"].values()),
                                       rtol=1e-4)
        params = [open(os.path.join(outputs[d] + name, "best_params.msgpack"), "rb").read() for d in (1, 8)]
        trees = [flax.serialization.msgpack_restore(p) for p in params]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *trees)


def test_a_bfloat16_run_learns_end_to_end_and_its_best_params_give_its_best_accuracy(tmp_path, capsys):
    argv = [*SMALL, "--synthetic-examples", "500", "--inner-steps", "10", "--outer-steps", "3", "--optimiser", "adam",
            "--learning-rate", "0.03", "--dtype", "bfloat16", "--output-dir", str(tmp_path)]
    train.main(argv)
    assert "\nnote: bfloat16 on a CPU runs about 3x slower than float32" in capsys.readouterr().out
    header, records, summary = read_metrics(tmp_path)
    assert header["config"]["dtype"] == "bfloat16" and records[-1]["loss"] < records[0]["loss"]
    assert summary["best"]["validation_accuracy"] >= 0.3  # chance is 0.1
    # The run's own conv formulation: in bfloat16 the formulations round differently, by machine kind.
    model = ConvNet(channels=(8, 16), dense=16, dtype=jnp.bfloat16, conv=header["conv"])
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))["params"]
    best_params = flax.serialization.from_bytes(template, (tmp_path / "best_params.msgpack").read_bytes())
    # Exactly, through the run's own evaluator (its devices, shards and chunks): on a CPU with AMX, bfloat16 dots
    # round by the shape of the work, so a one-device forward of all 50 images can flip an image (measured: 0.78
    # against the run's 0.80). That plain recount must still agree to within two images.
    run_config = config.parse(argv)
    shared = train.Shared(run_config)
    score = train.accuracies(run_config, shared.prepared(), shared.programs_for(run_config),
                             parallel.replicate(best_params))
    best = summary["best"]["validation_accuracy"]
    assert score["validation_correct"] / shared.prepared().val_count == best
    validation = data.load_synthetic("validation", 500, 16, 0, 1)
    assert abs(accuracy(model, best_params, validation) - best) <= 2 / len(validation.labels) + 1e-9


@pytest.mark.parametrize("argv,message", [
    (["--optimiser", "rmsprop"], "argument --optimiser: invalid choice: 'rmsprop'"),
    (["--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
    (["--learning-rate=-1e-3"], "--learning-rate must be positive"),
    (["--inner-steps", "0"], "--inner-steps must be positive, got 0"),
    (["--outer-steps=-2"], "--outer-steps must be positive, got -2"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--channels", "8,x"], "--channels '8,x' is not a comma-separated list"),
    (["--num-processes", "2"], "go together"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id 2 is outside 0..1"),
    (["--dataset", "folder"], "--dataset folder needs --data-dir"),
    (["--dataset", "folder", "--data-dir", "/no/such/folder"], "data folder /no/such/folder does not exist"),
    (["--dataset", "folder", "--data-dir", "{empty}"], "has no class sub-folders"),
    (["--dataset", "folder", "--data-dir", "{corrupt}"], "cannot read image .*River_3.jpg"),
    (["--dataset", "folder", "--data-dir", "{oblong}"],
     "the images are 12x16 (height x width); the 8 dihedral forms need square images: crop them square, or train "
     "with --no-augment"),
    (["--output-dir", "/proc/no-such-run"], "--output-dir /proc/no-such-run cannot be written: "),
    (["--output-dir", "{file}"], "exists and is not a folder"),
    ([*SMALL, "--train-examples", "100000"], "--train-examples 100000 is outside 1..1600"),
    ([*SMALL, "--synthetic-examples", "40"], "the validation split has 4 examples, fewer than the 8 devices"),
    (["--coordinator-address", "nohost", "--num-processes", "2", "--process-id", "0"], "'nohost' is not host:port"),
    (["--resume"], "--resume needs --output-dir"),
    ([*SMALL, "--resume", "--output-dir", "{empty}"], "--resume: no checkpoint in"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be positive, got 0"),
    (["--distributed-timeout", "0"], "--distributed-timeout must be positive, got 0"),
    (["--weight-decay=-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--warmup-steps", "300", "--schedule", "warmup_cosine"],
     "--warmup-steps must be in [0, total steps 13), got 300"),
    (["--microbatch=-1"], "--microbatch must be >= 0 (0 = automatic), got -1"),
    (["--target-accuracy", "1.5"], "--target-accuracy must be in (0, 1], got 1.5"),
    (["--epsilon", "0"], "--epsilon must be positive, got 0.0"),
    (["--train-eval-examples", "0"], "--train-eval-examples must be positive, got 0"),
    (["--optimiser", "adam", "--momentum", "0.5"], "--momentum is SGD's; adam has none"),
    (["--optimiser", "sgd", "--weight-decay", "0.1"],
     "--weight-decay is LAMB's, Adam's and Muon's (decoupled); sgd has none"),
    (["--optimiser", "lbfgs", "--weight-decay", "0.1"], "--weight-decay is LAMB's, Adam's and Muon's (decoupled); "
                                                        "lbfgs"),
    (["--optimiser", "lbfgs", "--batch-size", "64"], "--batch-size: lbfgs takes the whole set as its batch"),
    (["--optimiser", "lbfgs", "--schedule", "warmup_cosine", "--warmup-steps", "2"],
     "--schedule warmup_cosine: lbfgs's line search chooses each step's length"),
    (["--optimiser", "lbfgs", "--gradient-penalty", "0.1"], "--gradient-penalty: lbfgs's line search evaluates"),
    (["--optimiser", "lbfgs", "--lbfgs-memory", "0"], "--lbfgs-memory must be positive, got 0"),
    (["--lbfgs-memory", "5"], "--lbfgs-memory is L-BFGS's; lamb keeps no curvature pairs"),
    (["--optimiser", "muon", "--momentum", "0.5"], "--momentum is SGD's; muon has none to set (Muon's momentum is "
                                                   "optax's 0.95)"),
    (["--optimiser", "muon", "--epsilon", "1e-6"], "--epsilon is LAMB's and Adam's; muon has none here"),
    (["--optimiser", "sgd", "--epsilon", "1e-6"], "--epsilon is LAMB's and Adam's; sgd has none here"),
    (["--optimiser", "muon", "--lamb-exclude-biases"], "--lamb-exclude-biases is LAMB's; muon has no trust ratio"),
    (["--warmup-steps", "5"], "--warmup-steps needs a warmup schedule: add --schedule warmup_cosine or warmup_linear"),
    (["--output-dir", "gs://bucket/run"], "--output-dir gs://bucket/run: a URL is not a folder train.py can write; "
                                          "give a folder every host sees"),
    (["--optimiser", "adam", "--lamb-exclude-biases"], "--lamb-exclude-biases is LAMB's; adam has no trust ratio"),
    (["--ema", "1"], "--ema must be in [0, 1) (0: none), got 1.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--gradient-penalty=-1"], "--gradient-penalty must be >= 0 (0: none), got -1.0"),
    (["--penalty-block", "0"], "--penalty-block must be positive, got 0"),
    (["--penalty-block", "8"], "--penalty-block needs --gradient-penalty"),
])
def test_bad_input_exits_non_zero_with_one_line_naming_the_problem(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    make_images(tmp_path / "corrupt", corrupt=True)
    make_images(tmp_path / "oblong", per_class=40, size=(16, 12))  # width 16, height 12
    argv = [a.format(empty=tmp_path / "empty", corrupt=tmp_path / "corrupt", file=tmp_path / "file",
                     oblong=tmp_path / "oblong") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--inner-steps", "1"] * ("--inner-steps" not in argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ")
    assert re.search(message if "*" in message else re.escape(message), err[0]), err[0]


def test_a_bad_image_in_the_test_split_is_found_before_the_first_step_with_eval_test(tmp_path):
    folder = make_images(tmp_path / "images", per_class=40)
    (test_image,) = data.split_ids(config.Config(dataset="folder", data_dir=str(folder)), "test")[:1]
    (folder / test_image).write_bytes(b"\xff\xd8 truncated")
    result = run_train(["--dataset", "folder", "--data-dir", str(folder), "--channels", "4", "--dense", "4",
                        "--inner-steps", "1", "--outer-steps", "1", "--eval-test"], check=False)
    assert result.returncode == 2 and "outer 1/1" not in result.stdout  # before training, not after it
    assert result.stderr.strip().splitlines() == [f"train.py: error: cannot read image {folder / test_image}: "
                                                  + result.stderr.split(f"{test_image}: ", 1)[1].strip()]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o500)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*SMALL, "--output-dir", str(tmp_path / "locked" / "run")])
    assert exit_info.value.code == 2 and "cannot be written: Permission denied" in capsys.readouterr().err


def test_missing_eurosat_stops_with_instructions_and_no_traceback(tmp_path):
    result = run_train(["--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(tmp_path)], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "holds no EuroSAT.zip" in result.stderr and "--dataset folder" in result.stderr


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [o for action in config.build_parser()._actions for o in action.option_strings if o != "-h"]
    assert len(flags) > 30 and "--distributed-timeout" in flags
    for flag in flags:
        assert flag in text
    assert "(default: 100)" in text and "(default: lamb)" in text


def test_a_diverging_run_stops_with_a_message_and_keeps_its_metrics(tmp_path):
    result = run_train([*SMALL, "--synthetic-examples", "300", "--inner-steps", "5", "--outer-steps", "4",
                        "--optimiser", "sgd", "--learning-rate", "1e8", "--output-dir", str(tmp_path)], check=False)
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "diverged" in line]
    assert len(message) == 1 and "after outer loop 1" in message[0] and "last finite loss None" in message[0]
    with open(tmp_path / "metrics.jsonl") as f:
        assert '"diverged": true' in f.read().splitlines()[-1]


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine", "warmup_linear"])
def test_schedules_scale_the_peak_rate_by_their_shape(schedule):
    shape = optimisers.schedule_shape(schedule, 10, 100)
    values = [float(shape(step)) for step in (0, 5, 10, 33, 55, 100)]
    # At step 33, 23 of the 90 decay steps in, cosine and linear decay part: 0.85 against 0.74.
    cosine = 0.5 * (1 + np.cos(np.pi * 23 / 90))
    expected = {"constant": [1, 1, 1, 1, 1, 1], "warmup_cosine": [0, 0.5, 1, cosine, 0.5, 0],
                "warmup_linear": [0, 0.5, 1, 1 - 23 / 90, 0.5, 0]}[schedule]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_the_schedule_shapes_every_update_over_the_whole_run_of_inner_times_outer_steps():
    """The updates themselves follow the schedule, over inner x outer steps (not one inner loop)."""
    c = config.Config(optimiser="sgd", learning_rate=1.0, momentum=0.0, schedule="warmup_linear", warmup_steps=2,
                      inner_steps=2, outer_steps=3, channels=(4,), dense=4, dataset="synthetic")
    batch = parallel.on_devices(np.zeros((8, 1, 8, 8, 3), np.uint8), np.zeros((8, 1), np.int32), np.ones((8, 1)))
    programs = train.build_programs(c, device_data.Prepared(batch, batch, 8, 8, 1, 10, 8))
    state = TrainState.create(apply_fn=None, params={"w": np.zeros(3, np.float32)}, tx=programs.optimiser)
    state, sizes = optimisers.with_hyperparams(state, c), []
    for _ in range(6):  # a gradient of ones: each update's size is the rate in force
        new = state.apply_gradients(grads={"w": np.ones(3, np.float32)})
        sizes.append(float(state.params["w"][0] - new.params["w"][0]))
        state = new
    np.testing.assert_allclose(sizes, [0, 0.5, 1, 0.75, 0.5, 0.25], atol=1e-6)


def test_hyperparameters_live_in_the_optimiser_state_and_match_plain_optax():
    """An injected rate (and epsilon) gives the same update as optax's own optimiser built with it."""
    split, model, params = small_problem(16)
    grads = reference_loss_grads_correct(model, params, split)[1]
    results = {}
    defaults = config.DEFAULT_EPSILONS
    for name, epsilon, plain in [("lamb", None, optax.lamb(0.01, eps=defaults["lamb"], weight_decay=0.1)),
                                 ("lamb", 1e-3, optax.lamb(0.01, eps=1e-3, weight_decay=0.1)),
                                 ("adam", None, optax.adamw(0.01, eps=defaults["adam"], weight_decay=0.1)),
                                 ("adam", 1e-3, optax.adamw(0.01, eps=1e-3, weight_decay=0.1)),
                                 ("sgd", None, optax.sgd(0.01, momentum=0.5))]:
        rates = config.Config(optimiser=name, learning_rate=0.01, weight_decay=0.1, momentum=0.5, epsilon=epsilon)
        state = optimisers.create_state(model, optimisers.make_optimiser(name), 0, (8, 8, 3))
        state = optimisers.with_hyperparams(state, rates)
        state = state.replace(params=params)
        for _ in range(2):
            state = state.apply_gradients(grads=grads)
        expected, opt_state = params, plain.init(params)
        for _ in range(2):
            updates, opt_state = plain.update(grads, opt_state, expected)
            expected = optax.apply_updates(expected, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, expected)
        results[name, epsilon] = state.params
    for name in ("lamb", "adam"):  # the epsilon matters at this scale, so the check above could see it ignored
        differences = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), results[name, None], results[name, 1e-3])
        assert max(jax.tree.leaves(differences)) > 1e-4


@pytest.mark.parametrize("inner_loop", ["python", "compiled"])
def test_the_inner_loop_compiles_once_not_again_when_its_output_comes_back(inner_loop):
    """A state laid out otherwise than a pmapped function lays out its output made the second outer loop
    compile the whole inner loop again (review): count the traces after the first call."""
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, seconds, **_: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    # 3 steps: the compiled program of test_compiled_and_python_inner_loops_agree, compiled once for both
    c = config.parse([*SMALL, "--synthetic-examples", "300", "--inner-steps", "3", "--inner-loop", inner_loop])
    shared = train.Shared(c)
    programs, prepared = shared.programs_for(c), shared.prepared()
    state = train.start(c, prepared, programs, None, None)[0]
    no_signal = SimpleNamespace(received=None, flags=lambda: np.zeros(jax.local_device_count(), np.int32))
    state = programs.inner(state, *prepared.train_data, seed=0, stop=no_signal)[0]
    traced = len(traces)
    for _ in range(2):
        state = programs.inner(state, *prepared.train_data, seed=0, stop=no_signal)[0]
    assert len(traces) == traced


def test_the_training_accuracy_of_the_first_train_eval_examples(tmp_path):
    """--train-eval-examples 20 over 8 devices: the first 3 training images of each device's shard (24 images;
    the shards are contiguous thirties of the split), recounted from the params of the last checkpoint."""
    train.main([*SMALL, "--synthetic-examples", "300", "--inner-steps", "2", "--outer-steps", "1", "--optimiser",
                "adam", "--learning-rate", "0.05", "--train-eval-examples", "20", "--output-dir", str(tmp_path)])
    header, records, _ = read_metrics(tmp_path)
    record = records[0]
    model = ConvNet(channels=(8, 16), dense=16, conv=header["conv"])
    params = latest_checkpoint(tmp_path)[1]["state"]["params"]
    split = data.load_synthetic("train", 300, 16, 0, 1)  # 240 images, 30 per device
    picked = np.concatenate([np.arange(30 * d, 30 * d + 3) for d in range(8)])
    predictions = np.argmax(np.asarray(model.apply({"params": params}, split.images[picked])), -1)
    assert record["train_accuracy"] == (predictions == split.labels[picked]).mean()
    assert record["train_accuracy"] != accuracy(model, params, split)  # not the whole split's
