"""What restores generalisation to a whole-set batch: a moving average of the weights, label smoothing, LAMB as
its authors ran it, a gradient-norm penalty; each against a computation written here independently."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import augment
import config
import data
import optimisers
import parallel
import steps
import train
from helpers import SMALL, read_metrics
from model import ConvNet


def problem(n, seed=0):
    rng = np.random.default_rng(seed)
    split = data.Split(rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32))
    model = ConvNet(channels=(4, 8), dense=8)
    return split, model, model.init(jax.random.PRNGKey(seed), split.images[:1])["params"]


def test_the_moving_average_of_the_parameters_follows_each_update():
    """SGD (rate 0.1) on fixed gradients for 3 steps: the average is d a + (1 - d) p after each, from the start."""
    params = {"w": np.array([1.0, -2.0], np.float32), "b": np.zeros(2, np.float32)}
    grads = {"w": np.array([0.5, 1.0], np.float32), "b": np.array([1.0, -1.0], np.float32)}
    c = config.Config(optimiser="sgd", learning_rate=0.1, momentum=0.0, ema=0.9)
    tx = optimisers.make_optimiser("sgd", ema=0.9)
    state = optimisers.with_hyperparams(flax.training.train_state.TrainState.create(
        apply_fn=None, params=params, tx=tx), c)
    average = {k: v.astype(np.float64) for k, v in params.items()}
    current = dict(average)
    for _ in range(3):
        state = state.apply_gradients(grads=grads)
        current = {k: current[k] - 0.1 * grads[k] for k in current}
        average = {k: 0.9 * average[k] + 0.1 * current[k] for k in average}
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6), optimisers.averaged_params(state),
                 average)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6), state.params, current)
    assert optimisers.averaged_params(optimisers.create_state(ConvNet(channels=(4,), dense=4),
                                                              optimisers.make_optimiser("lamb"), 0, (8, 8, 3))) is None


def test_an_averaged_run_records_both_and_keeps_the_better_and_resumes_bit_exactly(tmp_path):
    run = [*SMALL, "--synthetic-examples", "300", "--inner-steps", "3", "--optimiser", "adam", "--learning-rate",
           "0.03", "--ema", "0.8"]
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "whole"), "--eval-test"])
    train.main([*run, "--outer-steps", "2", "--output-dir", str(tmp_path / "parts")])
    train.main([*run, "--outer-steps", "4", "--output-dir", str(tmp_path / "parts"), "--eval-test"])
    header, whole, summary = read_metrics(tmp_path / "whole")
    parts, summary_parts = read_metrics(tmp_path / "parts")[1:]
    assert parts == [dict(r, inner_seconds=p["inner_seconds"], images_per_second=p["images_per_second"],
                          train_seconds=p["train_seconds"], elapsed_seconds=p["elapsed_seconds"])
                     for r, p in zip(whole, parts)]  # every measured value equal, but the times
    for r in whole:
        chosen = max(("raw", "ema"), key=lambda name: (r[f"{name}_validation_accuracy"], name == "raw"))
        assert r["params"] == chosen and r["validation_accuracy"] == r[f"{chosen}_validation_accuracy"]
    assert {r["params"] for r in whole} == {"raw", "ema"} or len(whole) < 4  # both chosen somewhere, as a rule
    best = max(whole, key=lambda r: r["validation_accuracy"])
    assert summary["best"]["params"] == best["params"] and summary_parts["test_accuracy"] == summary["test_accuracy"]
    # The best params file holds the chosen params of the best outer loop: its validation accuracy recounted.
    model = ConvNet(channels=(8, 16), dense=16, conv=header["conv"])  # the run's formulation: its rounding
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))["params"]
    params = flax.serialization.from_bytes(template, (tmp_path / "whole" / "best_params.msgpack").read_bytes())
    validation = data.load_synthetic("validation", 300, 16, 0, 1)
    predictions = np.argmax(np.asarray(model.apply({"params": params}, validation.images)), -1)
    assert (predictions == validation.labels).mean() == best["validation_accuracy"]


def test_label_smoothing_is_the_cross_entropy_against_smoothed_labels():
    split, model, params = problem(6)
    params = {**params, "Dense_1": {"kernel": params["Dense_1"]["kernel"] * 300, "bias": params["Dense_1"]["bias"]}}
    logits = np.asarray(model.apply({"params": params}, split.images), np.float64)  # confident: smoothing matters
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.full((6, 10), 0.1 / 10) + 0.9 * np.eye(10)[split.labels]
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last is padding
    want = -(targets * log_softmax).sum(-1)[:5].sum()
    got = steps.loss_sum(params, model.apply, split.images, split.labels, mask, label_smoothing=0.1)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    plain = steps.loss_sum(params, model.apply, split.images, split.labels, mask)
    assert abs(float(plain) - want) > 1e-3 * want  # 1e2 times the tolerance above: the check could fail


def hand_lamb(params, grads_list, rate, decay, eps=1e-6, b1=0.9, b2=0.999, exclude_biases=False):
    """LAMB written out in NumPy: Adam's bias-corrected moments, decoupled weight decay, a per-array trust
    ratio |p| / |u| (1 where either is 0); with exclude_biases, biases take neither decay nor trust ratio."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_list, 1):
        for k in params:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            update = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            plain = exclude_biases and k.endswith("bias")
            if not plain:
                update = update + decay * params[k]
                p_norm, u_norm = np.linalg.norm(params[k]), np.linalg.norm(update)
                update = update * (p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
            params[k] = params[k] - rate * update
    return params


@pytest.mark.parametrize("exclude_biases", [True, False])
def test_lamb_with_and_without_biases_excluded_against_a_hand_written_lamb(exclude_biases):
    split, model, params = problem(8)
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    rng = np.random.default_rng(1)
    grads_list = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat.items()} for _ in range(3)]
    c = config.Config(optimiser="lamb", learning_rate=0.01, weight_decay=0.1, epsilon=1e-6,
                      lamb_exclude_biases=exclude_biases)
    tx = optimisers.make_optimiser("lamb", lamb_exclude_biases=exclude_biases)
    state = optimisers.with_hyperparams(flax.training.train_state.TrainState.create(
        apply_fn=None, params=params, tx=tx), c)
    for grads in grads_list:
        state = state.apply_gradients(grads=flax.traverse_util.unflatten_dict(
            {tuple(k.split("/")): v for k, v in grads.items()}))
    want = hand_lamb(flat, grads_list, 0.01, 0.1, exclude_biases=exclude_biases)
    got = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(state.params).items()}
    for key in flat:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # Biases start at zero: with the trust ratio they barely move (|p| = 0 gives a ratio of 1 at first, then a
    # tiny |p|); without it they move by the rate each step.
    moved = np.abs(got["Conv_0/bias"]).max()
    assert (moved > 0.02) == exclude_biases


def penalised_objective(params, model, images, labels, penalty, block):
    """Mean loss + penalty / 2 x mean over blocks of |grad of the block's mean loss|^2, plainly."""
    def mean_loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    count = len(labels) // block
    squares = [sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(mean_loss)(
        params, images[k * block:(k + 1) * block], labels[k * block:(k + 1) * block]))) for k in range(count)]
    return mean_loss(params, images, labels) + penalty / 2 * sum(squares) / count


def test_the_gradient_penalty_s_gradient_against_finite_differences_and_on_one_and_eight_devices():
    """16 examples, blocks of 2 (one per device on 8 devices, chunks of 2): the step's gradient is the
    penalised objective's, checked along random directions by central differences of that objective written
    out here; and the same on one device (blocks and chunks the same partition)."""
    split, model, params = problem(16, seed=3)
    penalty, block = 2.0, 2
    state = optimisers.create_state(model, optax.sgd(1.0), 0, (8, 8, 3)).replace(params=params)
    kwargs = dict(example_count=16.0, population=16.0, microbatch=2, penalty=penalty, penalty_block=block)
    eight = jax.pmap(functools.partial(steps.loss_and_gradient, **kwargs), axis_name=parallel.AXIS)
    loss, grads, _ = eight(flax.jax_utils.replicate(state), *parallel.on_devices(*data.pad_and_shard(split, 8, 2)))
    grads = jax.tree.map(lambda g: np.asarray(g[0], np.float64), grads)
    one_device = jax.devices()[:1]
    one = jax.pmap(functools.partial(steps.loss_and_gradient, **kwargs), axis_name=parallel.AXIS, devices=one_device)
    batch = (split.images[None], split.labels[None], np.ones((1, 16), np.float32))
    loss_one, grads_one, _ = one(flax.jax_utils.replicate(state, one_device), *batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b[0]), rtol=1e-4, atol=1e-7), grads, grads_one)
    plain, plain_grads = jax.jit(jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, split.images), split.labels).mean()))(params)
    np.testing.assert_allclose(float(loss[0]), float(plain), rtol=1e-5)  # the loss reported is the plain one
    difference = np.sqrt(sum(np.sum((a - np.asarray(b)) ** 2) for a, b in zip(jax.tree.leaves(grads),
                                                                              jax.tree.leaves(plain_grads))))
    assert difference > 0.1 * np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(plain_grads)))
    # One compiled program, evaluated six times below (op by op, its eight block gradients took seconds each time).
    objective = jax.jit(functools.partial(penalised_objective, model=model, images=split.images, labels=split.labels,
                                          penalty=penalty, block=block))
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        size = 1e-2
        shifted = [jax.tree.map(lambda p, d: p + sign * size * d, params, direction) for sign in (1, -1)]
        numeric = (float(objective(shifted[0])) - float(objective(shifted[1]))) / (2 * size)
        analytic = sum(np.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def one_sgd_step(c, split, params):
    """One step of the programs train.py builds for `c` (rate 1 SGD unless c says otherwise) on `split` over 8
    devices: (the params after it, the programs)."""
    import device_data
    from types import SimpleNamespace
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, len(split.labels) // 8))
    prepared = device_data.Prepared(batch, batch, len(split.labels), len(split.labels), 1, 10, len(split.labels))
    programs = train.build_programs(c, prepared)
    state = optimisers.with_hyperparams(optimisers.create_state(programs.model, programs.optimiser, 0, (8, 8, 3)), c)
    state = flax.jax_utils.replicate(state.replace(params=params))
    no_signal = SimpleNamespace(received=None, flags=lambda: np.zeros(jax.local_device_count(), np.int32))
    new_state = programs.inner(state, *batch, seed=0, stop=no_signal)[0]
    return jax.tree.map(lambda p: np.asarray(p[0], np.float64), new_state.params), programs


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_the_step_train_py_builds_descends_the_smoothed_loss(smoothing):
    """--label-smoothing reaches the compiled step: SGD at rate 1 moves by the smoothed loss's mean gradient,
    written here from log-softmax (its value matters: two values checked)."""
    split, model, params = problem(16)
    c = config.Config(optimiser="sgd", learning_rate=1.0, momentum=0.0, channels=(4, 8), dense=8, inner_steps=1,
                      outer_steps=1, inner_loop="python", microbatch=1, dataset="synthetic", no_augment=True,
                      label_smoothing=smoothing)
    new, programs = one_sgd_step(c, split, params)
    assert programs.step_kwargs["label_smoothing"] == smoothing

    def smoothed(p):
        log_softmax = jax.nn.log_softmax(model.apply({"params": p}, split.images))
        targets = (1 - smoothing) * jax.nn.one_hot(split.labels, 10) + smoothing / 10
        return -(targets * log_softmax).sum(-1).mean()
    grads = jax.grad(smoothed)(params)
    jax.tree.map(lambda after, before, g: np.testing.assert_allclose(before - after, g, rtol=1e-4, atol=1e-7), new,
                 params, grads)


def test_the_step_train_py_builds_runs_lamb_without_biases_in_decay_and_trust_ratio():
    """--lamb-exclude-biases reaches the compiled step: a zero bias moves by about the rate each step (Adam's
    first updates are about the gradient's sign), where plain LAMB's trust ratio holds it after its first."""
    split, model, params = problem(16)
    moved = {}
    for exclude in (True, False):
        c = config.Config(optimiser="lamb", learning_rate=0.01, channels=(4, 8), dense=8, inner_steps=2,
                          outer_steps=1, inner_loop="python", microbatch=2, dataset="synthetic", no_augment=True,
                          lamb_exclude_biases=exclude)
        new = one_sgd_step(c, split, params)[0]
        moved[exclude] = np.abs(new["Conv_0"]["bias"]).max()
    # Excluded: two steps of about the rate each. Plain LAMB: the rate once (a zero norm gives a trust ratio of 1),
    # then the rate times |p| / |u|, about a hundredth of it.
    assert 0.015 < moved[True] <= 0.0201 and 0.0099 < moved[False] < 0.0102


def test_penalty_blocks_lie_within_the_gradient_chunks_and_a_device_holds_whole_blocks():
    """The chunk (microbatch) is a multiple of the penalty's block, so no block straddles two chunks; a device
    holding fewer examples than a block, or not a multiple of it, is refused (its examples would go
    unpenalised, silently)."""
    import dataclasses
    import device_data
    split = problem(384)[0]
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 48))  # 48 per device
    prepared = device_data.Prepared(batch, batch, 384, 384, 1, 10, 384, train_fewest_per_device=48)
    c = config.Config(optimiser="adam", channels=(4, 8), dense=8, dataset="synthetic", no_augment=True,
                      microbatch=32, gradient_penalty=1.0, penalty_block=24)
    assert train.build_programs(c, prepared).microbatch == 24  # 32 rounded down to whole blocks
    for changed, message in [(dict(penalty_block=64), "--penalty-block 64 is more than the 48 examples"),
                             (dict(penalty_block=32), "--penalty-block 32 does not divide the 48 examples"),
                             (dict(penalty_block=32, batch_size=128), "--penalty-block 32 is more than the 16")]:
        with pytest.raises(train.UsageError, match=message):
            train.build_programs(dataclasses.replace(c, **changed), prepared)


def test_with_the_eight_forms_a_chunk_holds_whole_images_and_whole_penalty_blocks():
    """Augmented, an image's 8 forms lie side by side: a chunk must hold whole images (the noise scale's unit)
    and whole blocks, whatever the block, so it is a multiple of both 8 and the block (12 images x 8 forms per
    device here; the asked microbatch rounded down to that multiple)."""
    import device_data
    split = data.Split(np.zeros((96, 8, 8, 3), np.uint8), np.zeros(96, np.int32))  # only the shapes matter
    batch = augment.expand_sharded(*parallel.on_devices(*data.pad_and_shard(split, 8, 12)))
    prepared = device_data.Prepared(batch, batch, 96, 96, augment.NUM_TRANSFORMS, 10, 96, train_fewest_per_device=96)
    for block, asked, chunk in [(12, 40, 24), (4, 20, 16), (16, 40, 32), (24, 0, 24), (96, 40, 96)]:
        c = config.Config(optimiser="adam", channels=(4, 8), dense=8, dataset="synthetic", microbatch=asked,
                          gradient_penalty=1.0, penalty_block=block)
        assert train.build_programs(c, prepared).microbatch == chunk, (block, asked)


def test_penalty_blocks_of_eight_forms_take_each_image_s_gradient_and_a_block_of_padding_adds_nothing():
    """Blocks of 8 on an augmented shard are the images, each with its 8 forms (np.rot90's here): the penalty
    is that of each image's mean gradient over its forms; the block of the padding image adds nothing (no
    0 / 0 from its count of real examples)."""
    split, model, params = problem(3, seed=4)
    mask = np.array([1, 1, 0], np.float32)  # the third image is padding
    images, labels, forms_mask = augment.expand_shard(split.images, split.labels, mask)
    penalised = jax.jit(steps.penalised_loss_sum, static_argnums=(1, 5, 7))
    got_total, got_plain = penalised(params, model.apply, images, labels, forms_mask, 0.0, 2.0, 8)

    def mean_loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
    forms = [np.stack([np.rot90(np.fliplr(image) if t >= 4 else image, t % 4) for t in range(8)])
             for image in split.images[:2]]
    square = jax.jit(lambda p, x, y: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(jax.grad(mean_loss)(p, x, y))))
    squares = [float(square(params, x, np.full(8, label))) for x, label in zip(forms, split.labels[:2])]
    plain = sum(8 * float(mean_loss(params, x, np.full(8, label))) for x, label in zip(forms, split.labels[:2]))
    np.testing.assert_allclose(float(got_plain), plain, rtol=1e-5)
    np.testing.assert_allclose(float(got_total), plain + 2.0 * 8 / 2 * sum(squares), rtol=1e-4)


def test_the_penalty_counts_real_examples_only_and_its_loss_is_smoothed_inside_too():
    """penalised_loss_sum's value against one written here: with padding (each block's mean over its real
    examples) and label smoothing (in the loss and in the blocks' gradients)."""
    split, model, params = problem(8, seed=2)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)  # the second block of 4 holds 2 real examples
    # Each side compiled whole: op by op, double backpropagation compiled hundreds of programs.
    penalised = jax.jit(steps.penalised_loss_sum, static_argnums=(1, 5, 7))  # the model, smoothing and block
    got_total, got_plain = penalised(params, model.apply, split.images, split.labels, mask, 0.2, 3.0, 4)

    def smoothed_sum(p, x, y):
        log_softmax = jax.nn.log_softmax(model.apply({"params": p}, x))
        return -(((1 - 0.2) * jax.nn.one_hot(y, 10) + 0.2 / 10) * log_softmax).sum()
    plain = jax.jit(smoothed_sum)(params, split.images[:6], split.labels[:6])
    block_gradient = jax.jit(jax.grad(lambda p, x, y: smoothed_sum(p, x, y) / len(y)))
    squares = [sum(jnp.sum(g ** 2) for g in jax.tree.leaves(block_gradient(params, x, y)))
               for x, y in [(split.images[:4], split.labels[:4]), (split.images[4:6], split.labels[4:6])]]
    np.testing.assert_allclose(float(got_plain), float(plain), rtol=1e-5)
    np.testing.assert_allclose(float(got_total), float(plain + 3.0 * 4 / 2 * sum(squares)), rtol=1e-4)


def test_the_outer_loop_is_the_better_params_on_validation_raw_on_a_tie_and_the_best_keeps_them(tmp_path,
                                                                                               monkeypatch):
    """evaluate() picks the params that classify more validation images (the raw ones on a tie) and keep_best
    keeps exactly those, in best_params.msgpack too; a later tie does not replace the best."""
    from types import SimpleNamespace
    raw, average = {"w": np.ones(2, np.float32)}, {"w": np.full(2, 2.0, np.float32)}
    state = SimpleNamespace(params=raw, opt_state=(None, optimisers.AverageState(average)))
    prepared = SimpleNamespace(val_count=10, train_count=10, stride=1, val_local_count=10, num_classes=10)
    c = config.Config(ema=0.9, inner_steps=1, dataset="synthetic", output_dir=str(tmp_path))
    progress = {"outer": 0, "train_seconds": 0.0, "loss": 1.0,
                "best": {"validation_accuracy": -1.0, "outer": None, "step": None}}
    for raw_right, average_right, chosen in [(5, 7, "ema"), (6, 6, "raw"), (8, 3, "raw")]:
        counts = {id(raw): raw_right, id(average): average_right}
        monkeypatch.setattr(train, "accuracies", lambda c, p, programs, params: {
            "each": np.zeros(10, bool), "validation_correct": counts[id(params)], "train_correct": 1,
            "train_evaluated": 10, "broken": 0})
        monkeypatch.setattr(train, "in_split_order", lambda each, count: each)
        record, params = train.evaluate(c, prepared, None, state, 1.0, 0.0, progress, None)
        assert record["params"] == chosen and params is (average if chosen == "ema" else raw)
        assert (record["raw_validation_accuracy"], record["ema_validation_accuracy"]) == (raw_right / 10,
                                                                                            average_right / 10)
    record = {"validation_accuracy": 0.7, "outer": 1, "step": 1, "params": "ema"}
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    replicated = {"w": np.full((jax.local_device_count(), 2), 2.0, np.float32)}  # (devices, 2), as pmap holds it
    best = train.keep_best(c, record, replicated, None, progress)
    assert progress["best"]["params"] == "ema" and np.array_equal(best["w"], replicated["w"])
    saved = flax.serialization.msgpack_restore((tmp_path / "best_params.msgpack").read_bytes())
    assert np.array_equal(saved["w"], [2.0, 2.0])
    later = train.keep_best(c, {**record, "outer": 2, "params": "raw"}, {"w": np.zeros((8, 2), np.float32)}, best,
                            progress)
    assert later is best and progress["best"]["outer"] == 1  # a tie keeps the earlier best
