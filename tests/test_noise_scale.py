"""The gradient noise scale estimated in the step, against per-example gradients computed independently."""
import functools

import flax
import jax
import numpy as np
import optax
import pytest

import config
import data
import device_data
import noise_scale
import optimisers
import parallel
import steps
from model import ConvNet


def problem(n, seed=0, identical=False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    if identical:
        images, labels = np.repeat(images[:1], n, 0), np.repeat(labels[:1], n)
    model = ConvNet(channels=(4, 8), dense=8)
    params = model.init(jax.random.PRNGKey(seed), images[:1])["params"]
    return data.Split(images, labels), model, params


def per_example_gradients(model, params, images, labels) -> np.ndarray:
    """(n, parameters) in float64: each example's own loss gradient, by vmap(grad)."""
    def one(x, y):
        def loss(p):
            logits = model.apply({"params": p}, x[None])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).sum()
        return jax.grad(loss)(params)
    grads = jax.jit(jax.vmap(one))(images, labels)  # one program: op by op it compiled a hundred, seconds here
    return np.concatenate([np.asarray(g, np.float64).reshape(len(labels), -1) for g in jax.tree.leaves(grads)], 1)


def step_estimates(model, params, batch, *, example_count, population, microbatch, per_device_batch=0, step=0,
                   seed=0):
    """The (tr(Sigma), |G|^2) the step computes, and its mean gradient, for params replicated on 8 devices."""
    state = optimisers.create_state(model, optax.sgd(1.0), 0, (8, 8, 3)).replace(params=params, step=step)
    fn = jax.pmap(functools.partial(steps.loss_and_gradient, example_count=float(example_count),
                                    population=float(population), microbatch=microbatch,
                                    per_device_batch=per_device_batch, seed=seed), axis_name=parallel.AXIS)
    _, grads, noise = fn(flax.jax_utils.replicate(state), *batch)
    np.testing.assert_array_equal(np.asarray(noise), np.repeat(np.asarray(noise)[:1], 8, 0))  # alike everywhere
    flat = np.concatenate([np.asarray(g[0], np.float64).reshape(-1) for g in jax.tree.leaves(grads)])
    return np.asarray(noise[0], np.float64), flat


@pytest.mark.parametrize("microbatch", [1, 0])
def test_chunks_of_one_example_give_the_sample_covariance_of_the_per_example_gradients(microbatch):
    """The whole set as the batch, each example its own chunk (microbatch 1; or microbatch 0 with one
    real example per device): tr(Sigma) is the set's covariance trace over n - 1, |G|^2 exact. 13
    examples over 8 devices, 3 padding slots: chunks of padding count for nothing."""
    n = 13 if microbatch else 8
    split, model, params = problem(n)
    per_device = 2 if microbatch else 1
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, per_device))
    (trace, square), mean = step_estimates(model, params, batch, example_count=n, population=n,
                                           microbatch=microbatch)
    g = per_example_gradients(model, params, split.images, split.labels)
    np.testing.assert_allclose(mean, g.mean(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(square, np.sum(g.mean(0) ** 2), rtol=1e-4)
    np.testing.assert_allclose(trace, np.sum(np.var(g, axis=0, ddof=1)), rtol=1e-4)


def test_chunks_of_one_image_with_its_eight_forms_give_image_level_noise():
    """The whole augmented set, a chunk per image (its 8 forms, made on the devices): tr(Sigma) per form is 8
    times the covariance trace of the images' mean-over-forms gradients (forms made here with np.rot90)."""
    split, model, params = problem(13)
    train_data, count = device_data.prepare_split(split, "train", augmented=True)  # (8, 16, ...): padded
    (trace, square), _ = step_estimates(model, params, train_data, example_count=8 * count, population=8 * count,
                                        microbatch=8)
    forms = np.stack([np.rot90(np.fliplr(image) if t >= 4 else image, k=t % 4)
                      for image in split.images for t in range(8)])  # (104, 8, 8, 3)
    g = per_example_gradients(model, params, forms, np.repeat(split.labels, 8))
    per_image = g.reshape(13, 8, -1).mean(1)  # (13, parameters): each image's mean over its forms
    np.testing.assert_allclose(square, np.sum(g.mean(0) ** 2), rtol=1e-4)
    np.testing.assert_allclose(trace, 8 * np.sum(np.var(per_image, axis=0, ddof=1)), rtol=1e-4)
    fields = noise_scale.record_fields([trace * 3, square * 3], 3, 8, 13)  # the record: in training images
    b_simple = np.sum(np.var(per_image, axis=0, ddof=1)) / np.sum(per_image.mean(0) ** 2)
    np.testing.assert_allclose(fields["b_simple"], b_simple, rtol=1e-4)
    np.testing.assert_allclose(fields["set_over_b_simple"], 13 / b_simple, rtol=1e-4)


def test_identical_examples_have_no_gradient_noise():
    split, model, params = problem(16, identical=True)
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 2))
    (trace, square), mean = step_estimates(model, params, batch, example_count=16, population=16, microbatch=1)
    assert square > 0 and abs(trace) < 1e-4 * square
    np.testing.assert_allclose(square, np.sum(mean ** 2), rtol=1e-5)


def drawn(batch, step, seed, per_device_batch):
    """Which slots each device drew at `step`: (8, per_device_batch), as the step's own draw makes them."""
    ids = np.tile(np.arange(batch[1].shape[1], dtype=np.int32), (8, 1))
    draw = jax.pmap(functools.partial(steps.draw, per_device_batch=per_device_batch), axis_name=parallel.AXIS)
    return np.asarray(draw(batch[0], *parallel.on_devices(ids), batch[2], np.full(8, step, np.int32),
                           np.full(8, seed, np.int32))[1])


def test_a_drawn_batch_in_chunks_of_one_gives_its_sample_covariance_and_the_finite_population_correction():
    """--batch-size: 24 of 64 examples drawn (3 per device), each example a chunk: tr(Sigma) is the drawn
    examples' covariance trace over B - 1, and |G|^2 their mean's square less tr(Sigma) (1/B - 1/M)."""
    split, model, params = problem(64)
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 8))
    (trace, square), mean = step_estimates(model, params, batch, example_count=24, population=64, microbatch=1,
                                           per_device_batch=3, step=5, seed=2)
    slots = drawn(batch, 5, 2, 3)  # device d's slot s is example 8 d + s
    chosen = (np.arange(8)[:, None] * 8 + slots).reshape(-1)
    g = per_example_gradients(model, params, split.images, split.labels)[chosen]
    np.testing.assert_allclose(mean, g.mean(0), rtol=1e-4, atol=1e-7)
    want_trace = np.sum(np.var(g, axis=0, ddof=1))
    np.testing.assert_allclose(trace, want_trace, rtol=1e-4)
    np.testing.assert_allclose(square, np.sum(g.mean(0) ** 2) - want_trace * (1 / 24 - 1 / 64), rtol=1e-4)


def test_over_many_drawn_batches_in_unequal_chunks_the_estimates_average_to_the_population_values():
    """Unbiased for chunks of unequal size (32 drawn of 64 examples, in 10 chunks of 3 and one of 2) and a batch
    drawn without replacement: the mean over 2,000 steps (1,000 epochs) is within a few percent of the set's
    own tr(Sigma) (over M - 1) and |G|^2, computed from every example's gradient. On one device: a draw on
    several is stratified by device, which these formulas treat as simple (a difference of order 1/examples
    per device: large for 8 examples a device, nothing for EuroSAT's thousands)."""
    split, model, params = problem(64, seed=1)
    g = per_example_gradients(model, params, split.images, split.labels)
    true_trace, true_square = np.sum(np.var(g, axis=0, ddof=1)), np.sum(g.mean(0) ** 2)
    state = optimisers.create_state(model, optax.sgd(1.0), 0, (8, 8, 3)).replace(params=params)
    step_count = 2000

    def every_step(state, images, labels, mask):  # the steps' estimates as one program
        estimate = functools.partial(steps.loss_and_gradient, images=images, labels=labels, mask=mask,
                                     example_count=32.0, population=64.0, microbatch=3, per_device_batch=32, seed=0)
        return jax.lax.map(lambda step: estimate(state.replace(step=step))[2], np.arange(step_count))
    one_device = jax.pmap(every_step, axis_name=parallel.AXIS, devices=jax.devices()[:1])
    batch = (split.images[None], split.labels[None], np.ones((1, 64), np.float32))  # (1 device, 64, ...)
    estimates = np.asarray(one_device(flax.jax_utils.replicate(state, jax.devices()[:1]), *batch)[0], np.float64)
    mean_trace, mean_square = estimates.mean(0)
    spread = estimates.std(0) / np.sqrt(step_count)  # the means' standard errors (the draws are close to independent)
    assert abs(mean_trace - true_trace) < 3 * spread[0] + 0.02 * true_trace, (mean_trace, true_trace, spread)
    assert abs(mean_square - true_square) < 3 * spread[1] + 0.02 * true_square, (mean_square, true_square, spread)
    # Tight enough to see a wrong chunk count (K for K - 1: 10% here) or a dropped correction (over 100% of |G|^2):
    assert spread[0] < 0.015 * true_trace and spread[1] < 0.05 * true_square, spread
    assert true_trace * (1 / 32 - 1 / 64) > true_square


def test_the_record_sums_numerator_and_denominator_over_the_steps_and_says_none_where_undefined():
    fields = noise_scale.record_fields([6.0, 2.0], 2, 8, 100)  # mean tr 3, mean |G|^2 1: 3 forms = 0.375 images
    assert fields == {"noise_trace": 3.0, "gradient_square": 1.0, "b_simple": 0.375, "set_over_b_simple": 100 / 0.375}
    assert noise_scale.record_fields([np.nan, 2.0], 2, 8, 100)["b_simple"] is None  # one chunk: no estimate
    assert noise_scale.record_fields([np.nan, 2.0], 2, 8, 100)["gradient_square"] == 1.0  # the whole set: exact
    assert noise_scale.record_fields([-6.0, 2.0], 2, 8, 100)["b_simple"] is None  # an estimate below 0
    assert noise_scale.record_fields([np.inf, 2.0], 2, 8, 100) == {
        "noise_trace": None, "gradient_square": 1.0, "b_simple": None, "set_over_b_simple": None}
    assert noise_scale.record_fields([6.0, -1.0], 2, 8, 100)["b_simple"] is None  # |G|^2 estimated below 0
    records = [{"noise_trace": 3.0, "gradient_square": 1.0}, {"noise_trace": 1.0, "gradient_square": 3.0}]
    assert noise_scale.pooled(records, 1) == 1.0  # (3 + 1) / (1 + 3), not the mean of 3 and 1/3


@pytest.mark.parametrize("asked,per_device,group,want", [
    (0, 512, 8, 32), (20, 512, 8, 16), (28, 512, 8, 24), (5, 512, 8, 8), (20, 512, 1, 20), (600, 512, 8, 512),
    (0, 24, 8, 24)])
def test_a_whole_set_chunk_holds_whole_images(asked, per_device, group, want):
    c = config.Config(microbatch=asked, dataset="synthetic")  # on the CPU: patch convs, 32 when automatic
    assert parallel.choose_microbatch(c, per_device, 64, group=group) == want
