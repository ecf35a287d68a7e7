"""Muon and L-BFGS as the project builds them, against optax driven directly on the same problem."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import config
import data
import optimisers
import parallel
import steps
from model import ConvNet


def small_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    split = data.Split(rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), rng.integers(0, 10, n).astype(np.int32))
    model = ConvNet(channels=(4, 8), dense=8)
    return split, model, model.init(jax.random.PRNGKey(seed), split.images[:1])["params"]


def mean_loss(model, images, labels, label_smoothing=0.0):
    def loss(params):
        logits = model.apply({"params": params}, images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
    return jax.jit(loss)


def one_update(name, params, grads, **rates):
    """The project's optimiser `name` with these rates, one update from `params`: the update applied."""
    model = ConvNet(channels=(4, 8), dense=8)
    state = optimisers.create_state(model, optimisers.make_optimiser(name), 0, (8, 8, 3))
    state = optimisers.with_hyperparams(state, config.Config(optimiser=name, **rates)).replace(params=params)
    return jax.tree.map(jnp.subtract, state.apply_gradients(grads=grads).params, params)


def newton_schulz(matrix, steps=5, coefficients=(3.4445, -4.7750, 2.0315)):
    """Muon's orthogonalisation in NumPy: the matrix over its Frobenius norm, then 5 quintic steps
    X <- a X + (b A + c A^2) X with A = X X^T (optax's coefficients, Keller Jordan's), on the wide side."""
    a, b, c = coefficients
    x = matrix / (np.linalg.norm(matrix) + 1e-8)
    wide = x.T if x.shape[0] > x.shape[1] else x
    for _ in range(steps):
        gram = wide @ wide.T
        wide = a * wide + (b * gram + c * gram @ gram) @ wide
    return wide.T if x.shape[0] > x.shape[1] else wide


def test_muon_orthogonalises_each_kernel_as_its_patch_matrix_and_steps_biases_by_nesterov_adamw():
    split, model, params = small_problem(16)
    grads = jax.grad(mean_loss(model, split.images, split.labels))(params)
    rate, decay = 0.02, 0.1
    update = one_update("muon", params, grads, learning_rate=rate, weight_decay=decay)
    for layer in ("Conv_0", "Conv_1", "Dense_0", "Dense_1"):
        kernel, gradient = params[layer]["kernel"], grads[layer]["kernel"]
        fan_out = kernel.shape[-1]
        fan_in = kernel.size // fan_out
        matrix = gradient.reshape(fan_in, fan_out)  # (3 * 3 * in, out) for a conv: its patches' matmul
        # The first step's Nesterov momentum is a positive multiple of the gradient, and Newton-Schulz
        # normalises its input, so the step is the gradient's matrix orthogonalised, scaled by shape and rate.
        orthogonal = newton_schulz(np.asarray(matrix, np.float64))
        scale = np.sqrt(max(1.0, fan_out / fan_in))
        expected = -rate * (scale * orthogonal.reshape(kernel.shape) + decay * kernel)
        np.testing.assert_allclose(update[layer]["kernel"], expected, rtol=2e-4, atol=1e-7)
        # What Newton-Schulz aims for: U S' V^T for the gradient's U S V^T, with S' near 1 (these coefficients
        # trade exactness for speed, leaving about 0.7 to 1.2) wherever S is not tiny against |G|_F (5 steps
        # raise a small one 3.4445^5 = 485-fold, so one below about 1e-3 of |G|_F stays small).
        left, spread, right = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
        step = (np.asarray(update[layer]["kernel"]) / -rate - decay * np.asarray(kernel)).reshape(fan_in, fan_out)
        reached = np.einsum("ik,ij,kj->k", left, step / scale, right)  # each singular direction's new value
        np.testing.assert_allclose(left @ np.diag(reached) @ right, step / scale, atol=1e-4)  # the same U and V
        not_tiny = spread / np.linalg.norm(spread) > 0.01
        assert not_tiny.sum() >= 4 and spread[not_tiny].max() / spread[not_tiny].min() > 3  # so this could fail
        assert 0.6 < reached[not_tiny].min() and reached[not_tiny].max() < 1.25, (layer, spread, reached)
    # The biases alone, by optax's AdamW with Nesterov momentum (muon's own AdamW part), without weight decay.
    biases = {layer: {"bias": params[layer]["bias"]} for layer in params}
    adamw = optax.adamw(rate, eps=1e-8, weight_decay=0.0, nesterov=True)
    expected = adamw.update({k: {"bias": grads[k]["bias"]} for k in grads}, adamw.init(biases), biases)[0]
    for layer in params:
        np.testing.assert_allclose(update[layer]["bias"], expected[layer]["bias"], rtol=1e-6, atol=1e-9)


def lbfgs_state(model, params, memory=10):
    state = optimisers.create_state(model, optimisers.make_optimiser("lbfgs", lbfgs_memory=memory), 0, (8, 8, 3))
    return optimisers.with_hyperparams(state, config.Config(optimiser="lbfgs")).replace(params=params)


@pytest.mark.parametrize("devices,smoothing", [(1, 0.3), (8, 0.0)])
def test_lbfgs_steps_equal_optax_lbfgs_driven_directly_on_the_whole_batch(devices, smoothing):
    """4 L-BFGS steps of the project's step (13 examples padded over the devices, a gradient chunk of 1
    example, the line search's evaluations chunked and all-reduced the same way) against optax.lbfgs with
    its zoom line search on the mean loss (label-smoothed in the 1-device case: the line search's loss must be
    the step's) on one device, and the evaluations each step reports
    against those its line search counted. (A line search whose evaluations differed per device would hang at
    its all-reduce: the test below checks directly that every device's line search gets the global gradient.)"""
    split, model, params = small_problem(13)
    state = flax.jax_utils.replicate(lbfgs_state(model, params), devices=jax.devices()[:devices])
    batch = data.pad_and_shard(split, devices, -(-13 // devices))  # (devices, per_device, ...): pmap places them
    step = jax.pmap(functools.partial(steps.observed_step, example_count=13.0, population=13.0, microbatch=1,
                                      line_search=True, label_smoothing=smoothing), axis_name=parallel.AXIS,
                    devices=jax.devices()[:devices])
    loss_fn = mean_loss(model, split.images, split.labels, smoothing)  # the line search's loss is the step's own
    kinds = [(leaf.shape, leaf.dtype, jax.typeof(leaf).weak_type) for leaf in jax.tree.leaves(state)]
    reference, expected = optax.lbfgs(memory_size=10), params
    reference_state = reference.init(expected)
    sums = np.zeros((devices, len(steps.SUMS)), np.float32)
    for number in range(4):
        state, loss, statistics = step(state, *batch, sums)
        value, grad = jax.value_and_grad(loss_fn)(expected)
        updates, reference_state = reference.update(grad, reference_state, expected, value=value, grad=grad,
                                                    value_fn=loss_fn)
        expected = optax.apply_updates(expected, updates)
        np.testing.assert_allclose(np.asarray(loss), float(value), rtol=1e-5)
        searched = int(optax.tree_utils.tree_get(reference_state, "num_linesearch_steps"))
        assert statistics["last_sums"][:, 2].tolist() == [1 + searched] * devices
        assert statistics["last_sums"][:, 3].tolist() == [0] * devices  # each found a sufficient decrease
        # The state comes out typed as it went in (weak types included), so the step compiles once, not twice.
        assert [(leaf.shape, leaf.dtype, jax.typeof(leaf).weak_type) for leaf in jax.tree.leaves(state)] == kinds
    assert state.step.tolist() == [4] * devices
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=2e-4, atol=2e-6), state.params, expected)
    assert float(loss_fn(expected)) < 0.95 * float(loss_fn(params))  # it moved: 4 steps that did nothing would fail
    for leaf in jax.tree.leaves(state.params):  # the same params on every device
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


def test_a_line_search_that_finds_no_decrease_is_reported_as_such():
    """A first trial step 1e30 times the direction: the line search halves it 20 times and finds no decrease."""
    split, model, params = small_problem(8)
    state = lbfgs_state(model, params)
    state = optimisers.with_hyperparams(state, config.Config(optimiser="lbfgs", learning_rate=1e30))
    state = flax.jax_utils.replicate(state)
    batch = parallel.on_devices(*data.pad_and_shard(split, 8, 1))
    step = jax.pmap(functools.partial(steps.observed_step, example_count=8.0, population=8.0, microbatch=0,
                                      line_search=True), axis_name=parallel.AXIS)
    statistics = step(state, *batch, np.zeros((8, len(steps.SUMS)), np.float32))[2]
    assert statistics["last_sums"][0, 3] == 1 and statistics["last_sums"][0, 2] > 2  # it tried, and fell short


def test_the_line_search_s_loss_and_gradient_are_the_global_smoothed_ones_on_every_device_chunk_by_chunk():
    """whole_set_loss under pmap on 8 devices (13 examples, chunks of 1): every device gets the global mean loss
    and gradient, with the step's label smoothing (a backward pass returning each device's own gradient once
    passed the 8-device L-BFGS test above), evaluated chunk by chunk (a scan), as the step's own is."""
    split, model, params = small_problem(13)
    batch = data.pad_and_shard(split, 8, 2)

    def value_and_grad(params, images, labels, mask):
        value = steps.whole_set_loss(model.apply, images, labels, mask, example_count=13.0, microbatch=1,
                                     label_smoothing=0.3)
        return jax.value_and_grad(value)(params)
    mapped = jax.pmap(value_and_grad, axis_name=parallel.AXIS, in_axes=(None, 0, 0, 0))
    assert "scan" in str(jax.make_jaxpr(mapped)(params, *batch))
    loss, grads = mapped(params, *batch)
    value, expected = jax.value_and_grad(mean_loss(model, split.images, split.labels, 0.3))(params)
    np.testing.assert_allclose(loss, np.full(8, value), rtol=1e-5)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, np.broadcast_to(e, g.shape), rtol=1e-4, atol=1e-7),
                 grads, expected)
