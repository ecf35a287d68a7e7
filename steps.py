"""The step of the experiment, on every device: the loss and gradient of the global batch (summed chunk by
chunk, all-reduced once), what the optimiser did, the gradient noise scale, and the inner loops (compiled,
or a host loop of pmapped steps that stops with every process after the same step); and evaluation.
L-BFGS's line search evaluates the same global loss, chunked and all-reduced the same way (whole_set_loss).
train.py compiles these into a run's programs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import noise_scale
from optimisers import line_search_info
from parallel import AXIS
from stopping import StopSignals

# What an outer loop sums over its steps: the noise scale's two estimates, the loss evaluations (with their
# gradients) the steps made: 1 a step, plus L-BFGS's line search's; and L-BFGS's line searches that found no
# sufficient decrease.
SUMS = ("noise_trace", "gradient_square", "evaluations", "line_search_failures")


def summed_over_chunks(fn, arrays, chunk):
    """fn(*arrays) for a fn that returns sums over examples, computed `chunk` examples at a time.

    Peak memory then follows the chunk, not the batch: the whole dataset fits any device.
    """
    n = arrays[0].shape[0]
    if not chunk or chunk >= n:
        return fn(*arrays)
    count, full = n // chunk, n // chunk * chunk
    heads = [a[:full].reshape(count, chunk, *a.shape[1:]) for a in arrays]  # (count, chunk, ...)
    shapes = jax.eval_shape(fn, *[h[0] for h in heads])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = lax.scan(lambda acc, xs: (jax.tree.map(jnp.add, acc, fn(*xs)), None), zeros, heads)
    if full < n:
        total = jax.tree.map(jnp.add, total, fn(*[a[full:] for a in arrays]))
    return total


def mapped_over_chunks(fn, arrays, chunk):
    """fn(*arrays) for a fn that maps each example to its own outputs, computed `chunk` examples at a time."""
    n = arrays[0].shape[0]
    if not chunk or chunk >= n:
        return fn(*arrays)
    count, full = n // chunk, n // chunk * chunk
    heads = [a[:full].reshape(count, chunk, *a.shape[1:]) for a in arrays]  # (count, chunk, ...)
    outputs = jax.tree.map(lambda o: o.reshape(full, *o.shape[2:]), lax.map(lambda xs: fn(*xs), heads))
    if full < n:
        outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, fn(*[a[full:] for a in arrays]))
    return outputs


def loss_sum(params, apply_fn, images, labels, mask, label_smoothing=0.0):
    """The summed cross-entropy of the real examples; with label_smoothing A, against labels smoothed by
    optax (1 - A on the class, A spread evenly over all classes)."""
    logits = apply_fn({"params": params}, images)  # (n, classes)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return jnp.sum(optax.softmax_cross_entropy(logits, targets) * mask)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask)


def penalised_loss_sum(params, apply_fn, images, labels, mask, label_smoothing, penalty, block):
    """loss_sum plus, for each block of `block` examples, penalty x block / 2 times the squared norm of the
    gradient of the block's mean loss, by double backpropagation (exact, and any conv formulation
    differentiates twice). Divided by the batch's example count as the step does, that is the loss plus
    penalty / 2 times the mean over blocks of |grad L_block|^2 (Geiping et al. 2022; Smith et al. 2021:
    what small batches' noise adds implicitly). Returns (that sum, the plain loss sum)."""
    plain = loss_sum(params, apply_fn, images, labels, mask, label_smoothing)
    count = images.shape[0] // block
    blocks = [a[:count * block].reshape(count, block, *a.shape[1:]) for a in (images, labels, mask)]

    def block_gradient_square(x, y, m):  # a block with no real example (padding) adds nothing
        mean = jax.grad(lambda p: loss_sum(p, apply_fn, x, y, m, label_smoothing) / jnp.maximum(m.sum(), 1))(params)
        return noise_scale.squared_norm(mean)
    squares = lax.map(lambda b: block_gradient_square(*b), blocks)  # (count,)
    return plain + penalty * block / 2 * jnp.sum(squares), plain


def draw(images, labels, mask, step, seed, *, per_device_batch):
    """This device's share of step `step`'s batch: `per_device_batch` of its real examples, drawn without
    replacement within an epoch of its own, in an order fixed by (seed, epoch, device). Nothing but the
    step number decides it, so a run resumed on the same device layout draws what the uninterrupted one
    would (another layout draws other batches). The real examples are a device's first slots (padding
    comes last) and are never fewer than the share (checked)."""
    slots = mask.shape[0]
    real = jnp.sum(mask > 0).astype(jnp.int32)
    first = step * per_device_batch  # this device's draws before this step
    positions = first + jnp.arange(per_device_batch)  # (per_device_batch,)
    epoch = first // real  # a step spans at most two epochs, as the share is at most `real`

    def order(e):  # a permutation of the real slots first, for epoch e
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), lax.axis_index(AXIS)), e)
        return jnp.argsort(jnp.where(jnp.arange(slots) < real, jax.random.uniform(key, (slots,)), 2.0))
    orders = jnp.stack([order(epoch), order(epoch + 1)])  # (2, slots)
    index = orders[positions // real - epoch, positions % real]  # (per_device_batch,)
    return images[index], labels[index], mask[index]


def loss_and_gradient(state, images, labels, mask, *, example_count, population, microbatch, per_device_batch=0,
                      seed=0, label_smoothing=0.0, penalty=0.0, penalty_block=0):
    """The mean loss over the global batch, its gradient (this device holds a shard), and the step's
    estimates of tr(Sigma) and |G|^2 from its gradient chunks (noise_scale.py). With per_device_batch, the
    batch is drawn from the shard (`draw`); else it is the whole shard. With a penalty, the gradient is the
    penalised objective's (penalised_loss_sum; its blocks lie within the chunks), the loss the plain one."""
    if per_device_batch:
        images, labels, mask = draw(images, labels, mask, state.step, seed, per_device_batch=per_device_batch)

    def chunk(x, y, m):
        if penalty:
            (_, loss), grads = jax.value_and_grad(penalised_loss_sum, has_aux=True)(
                state.params, state.apply_fn, x, y, m, label_smoothing, penalty, penalty_block)
        else:
            loss, grads = jax.value_and_grad(loss_sum)(state.params, state.apply_fn, x, y, m, label_smoothing)
        return loss, grads, noise_scale.chunk_terms(grads, jnp.sum(m))

    local = summed_over_chunks(chunk, (images, labels, mask), microbatch)
    # Sums from every device of every host (one all-reduce): the same step on 1 device or 256.
    loss, grads, terms = lax.psum(local, AXIS)
    loss, grads = jax.tree.map(lambda s: s / example_count, (loss, grads))
    return loss, grads, noise_scale.estimates(terms, grads, example_count, population)


def whole_set_loss(apply_fn, images, labels, mask, *, example_count, microbatch, label_smoothing=0.0, **_):
    """The global mean loss as a function of the params, for L-BFGS's line search: this device's chunked sums,
    all-reduced over every device of every host. Its gradient is the global one too, by a custom VJP whose
    backward pass returns the all-reduced gradient the forward pass computed with the loss (differentiating
    through `lax.psum` inside pmap gives each device a gradient of its own, which sends each device's line
    search its own way until their all-reduces hang). So every device evaluates the same trial steps."""
    def local_sums(params):
        def chunk(x, y, m):
            return jax.value_and_grad(loss_sum)(params, apply_fn, x, y, m, label_smoothing)
        return summed_over_chunks(chunk, (images, labels, mask), microbatch)

    def forward(params):
        loss, grads = lax.psum(local_sums(params), AXIS)  # one all-reduce per evaluation
        return loss / example_count, jax.tree.map(lambda g: g / example_count, grads)

    @jax.custom_vjp
    def value(params):
        return forward(params)[0]

    def backward(grads, cotangent):
        return (jax.tree.map(lambda g: g * cotangent, grads),)
    value.defvjp(forward, backward)
    return value


def apply_update(state, grads, loss, value_fn=None):
    """The optimiser's update; L-BFGS's also takes the loss and the function its line search evaluates. Returns
    (new state, [loss evaluations its line search made, 1 if it found no sufficient decrease])."""
    if value_fn is None:
        return state.apply_gradients(grads=grads), jnp.zeros(2, jnp.float32)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss, grad=grads,
                                         value_fn=value_fn)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    info = line_search_info(opt_state)
    return new_state, jnp.stack([info.num_linesearch_steps, info.decrease_error > 0]).astype(jnp.float32)


def updated(state, images, labels, mask, line_search=False, **step_kwargs):
    """loss_and_gradient, then the update: (new state, loss, gradient, the step's SUMS)."""
    loss, grads, noise = loss_and_gradient(state, images, labels, mask, **step_kwargs)
    value_fn = whole_set_loss(state.apply_fn, images, labels, mask, **step_kwargs) if line_search else None
    new_state, searched = apply_update(state, grads, loss, value_fn)
    return new_state, loss, grads, jnp.concatenate([noise, searched + jnp.array([1.0, 0.0])])


def train_step(state, images, labels, mask, **step_kwargs):
    """One update with the gradient of the mean loss over the global batch; (new state, loss before it)."""
    new_state, loss, *_ = updated(state, images, labels, mask, **step_kwargs)
    return new_state, loss


def optimiser_statistics(grads, params, new_params) -> dict:
    """What the update did: global norms of the gradient, the update and the parameters, and per parameter
    array the ratio of its update's norm to its norm (what LAMB's trust ratio sets to the learning rate;
    NaN where the parameters are all zero, as biases start)."""
    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
    updates = jax.tree.map(jnp.subtract, new_params, params)
    ratios = jax.tree.map(lambda u, p: jnp.where(norm(p) > 0, norm(u) / norm(p), jnp.nan), updates, params)
    return {"gradient_norm": norm(grads), "update_norm": norm(updates), "parameter_norm": norm(new_params),
            "update_ratios": ratios}


def observed_step(state, images, labels, mask, sums, **step_kwargs):
    """train_step, plus what the optimiser did (the same on every device: the gradient is all-reduced) and
    `sums` plus this step's SUMS: an outer loop sums them over its steps, and its last step's say whether
    L-BFGS's last line search fell short ("last_sums")."""
    new_state, loss, grads, step_sums = updated(state, images, labels, mask, **step_kwargs)
    return new_state, loss, {**optimiser_statistics(grads, state.params, new_state.params), "sums": sums + step_sums,
                             "last_sums": step_sums}


def step_agreeing_to_stop(state, images, labels, mask, seed, sums, stop_signal, **step_kwargs):
    """observed_step, plus the largest stop signal any process passed in: every process reads the same
    value after the same step, so all of them stop together."""
    return (*observed_step(state, images, labels, mask, sums, seed=seed, **step_kwargs),
            lax.pmax(stop_signal, AXIS))


def inner_loop(state, images, labels, mask, seed=0, *, steps, **step_kwargs):
    """`steps` updates as one program; returns the new state, the loss before the last update and what
    the optimiser did in the last update (with the noise estimates summed over the steps)."""
    step_kwargs["seed"] = seed

    def body(_, carry):
        return observed_step(carry[0], images, labels, mask, carry[2]["sums"], **step_kwargs)
    no_sums = jnp.zeros(len(SUMS), jnp.float32)
    shapes = jax.eval_shape(lambda: observed_step(state, images, labels, mask, no_sums, **step_kwargs)[2])
    nothing_yet = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return lax.fori_loop(0, steps, body, (state, jnp.zeros((), jnp.float32), nothing_yet))


def evaluation(params, images, labels, mask, stride, limit, *, apply_fn, chunk):
    """Whether each of this device's real examples is classified correctly, and over all devices the counts
    (correct, with a non-finite logit, examples evaluated); `stride` 8 picks the un-augmented images, `limit`
    (None: all) the first of them on each device. The second count catches params that the last update blew
    up, which the loss (computed before that update) cannot show."""
    def per_example(x, y, m):
        logits = apply_fn({"params": params}, x)  # (n, classes)
        real = m > 0
        return (jnp.argmax(logits, axis=-1) == y) & real, ~jnp.all(jnp.isfinite(logits), axis=-1) & real
    picked = [a[::stride][:limit] for a in (images, labels, mask)]
    correct, broken = mapped_over_chunks(per_example, picked, chunk)
    counts = jnp.stack([correct.sum(), broken.sum(), (picked[2] > 0).sum()])
    return correct, lax.psum(counts, AXIS)  # (n,), (3,)


def python_inner_loop(step, steps, state, *batch, seed, stop: StopSignals, on_step=None):
    """The inner steps as a host loop of pmapped steps, or None when a stop signal came before they were
    all done (every process then stops after the same step). on_step() follows each finished step."""
    loss, statistics, agreed = None, None, None
    sums = np.zeros((jax.local_device_count(), len(SUMS)), np.float32)
    for number in range(steps):
        if jax.process_count() == 1 and stop.received:  # alone, no need to wait for an agreement
            stop.agreed, stop.steps_done = stop.received, number
            return None
        seeds = np.full(jax.local_device_count(), seed, np.int32)
        state, next_loss, next_statistics, next_agreed = step(state, *batch, seeds, sums, stop.flags())
        sums = next_statistics["sums"]
        if agreed is not None:
            if int(agreed[0]):  # waits for the step before: one step queued at most
                next_loss.block_until_ready()  # every process launched this step; let it end everywhere
                stop.agreed, stop.steps_done = int(agreed[0]), number + 1
                return None
            if on_step:
                on_step()
        loss, statistics, agreed = next_loss, next_statistics, next_agreed
    loss.block_until_ready()
    if on_step:
        on_step()
    return state, loss, statistics
