"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, estimated inside the step from its gradient chunks.

McCandlish, Kaplan, Amodei et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162):
G is the mean gradient over the training set, Sigma the covariance of one example's gradient. Training
with batches of B examples takes S = S_min (1 + B_crit / B) steps and E = E_min (1 + B / B_crit) examples
to a given loss, and B_crit is close to B_simple: below it a larger batch saves steps almost one for one,
above it a larger batch mostly spends examples.

The estimator is the paper's two-batch one (its appendix A), with the step's own gradient chunks as the
small batches and the step's batch as the big one, nothing computed twice. A chunk c of b_c real examples
has mean gradient G_c; the step's batch of B examples has mean gradient G_B; the training set holds M
examples. The batch is drawn without replacement from that finite set (or is all of it), so
E |G_b|^2 = |G|^2 + tr(Sigma) (1/b - 1/M), with Sigma the set's covariance taken over M - 1. Then

    tr(Sigma) ~ (sum_c b_c |G_c|^2 - B |G_B|^2) / (K - 1)        (K chunks holding real examples)
    |G|^2     ~ |G_B|^2 - tr(Sigma) (1/B - 1/M)

both unbiased (over the random order of the examples), for chunks of any sizes: the sum's expectation is
B |G|^2 + tr(Sigma) (K - B/M), the other term's B |G|^2 + tr(Sigma) (1 - B/M). With equal chunks of b the
first is the paper's (|G_b|^2 - |G_B|^2) / (1/b - 1/B), the finite-population correction cancelling in
the difference. **When the batch is the whole set (B = M, the experiment's step), |G|^2 is exact** and the
chunks partition the finite population: tr(Sigma) is then the population's, and no correction is left.

What one example is, and so the unit of B_simple: the chunks are what the step sums at once (a device's
share, cut into --microbatch chunks). In the whole-set step the 8 dihedral forms of an image sit next to
each other and a chunk always holds whole images (the microbatch is a multiple of 8, `parallel`), so the
estimate measures the noise of drawing *training images* with all their forms: B_simple counted in forms
is 8 times that counted in images. In a --batch-size step every example is drawn on its own (one form of
one image), so the estimate is that of drawing forms. The record gives B_simple in training images (forms
/ 8 where the set is augmented) and N / B_simple (N the training images of the set), which is the same
number in either unit: how many critical batches one whole-set step holds. A --batch-size draw is per
device (each draws its share of its own shard): stratified rather than simple random sampling, which the
formulas above treat as simple (the shards are contiguous runs of a random order of the images).

Per step the two estimates are noisy, and a ratio of noisy estimates is biased, so an outer loop sums
each over its steps and divides the sums (`record_fields`); so does anything that pools outer loops or runs.
"""
import math

import jax
import jax.numpy as jnp


def squared_norm(tree) -> jnp.ndarray:
    """The sum of squares over every array of a tree, in float32."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def chunk_terms(gradient_sum, count) -> dict:
    """What one chunk adds to the estimate: b_c |G_c|^2 = |sum of its gradients|^2 / b_c, and whether it
    holds a real example (chunks of padding only count for nothing). `count` is its real examples."""
    real = count > 0
    return {"chunk_squares": jnp.where(real, squared_norm(gradient_sum) / jnp.maximum(count, 1), 0.0),
            "chunks": real.astype(jnp.float32)}


def estimates(terms: dict, mean_gradient, batch: float, population: float) -> jnp.ndarray:
    """(tr(Sigma), |G|^2) of one step, per example, from the chunk terms summed over every device and the
    step's mean gradient; NaN where fewer than 2 chunks hold real examples."""
    big = squared_norm(mean_gradient)  # |G_B|^2
    trace = (terms["chunk_squares"] - batch * big) / (terms["chunks"] - 1)
    trace = jnp.where(terms["chunks"] > 1, trace, jnp.nan)
    square = big if batch == population else big - trace * (1 / batch - 1 / population)  # the whole set: exact
    return jnp.stack([trace, square])  # (2,)


def record_fields(sums, steps: int, stride: int, train_images: int) -> dict:
    """An outer loop's noise figures from its steps' summed (tr(Sigma), |G|^2): their means over the steps,
    B_simple = tr(Sigma) / |G|^2 in training images (the examples' count / stride), and N / B_simple.
    B_simple is None where it is undefined (fewer than 2 chunks, or an estimated |G|^2 not above 0)."""
    trace, square = (float(value) / steps for value in sums)
    trace, square = (value if math.isfinite(value) else None for value in (trace, square))  # JSON has no NaN
    b_simple = trace / square / stride if trace is not None and square and square > 0 and trace >= 0 else None
    return {"noise_trace": trace, "gradient_square": square, "b_simple": b_simple,
            "set_over_b_simple": train_images / b_simple if b_simple else None}


def pooled(records: list[dict], stride: int) -> float | None:
    """B_simple (training images) over several records: the sum of their tr(Sigma) over that of |G|^2."""
    usable = [r for r in records if r.get("noise_trace") is not None and r.get("gradient_square") is not None]
    square = sum(r["gradient_square"] for r in usable)
    return sum(r["noise_trace"] for r in usable) / square / stride if usable and square > 0 else None
