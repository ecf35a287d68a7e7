"""The optimisers (optax LAMB, AdamW, SGD with momentum, Muon, L-BFGS) with their rates in the optimiser state,
and the learning-rate schedules."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState


def schedule_shape(name: str, warmup_steps: int, total_steps: int):
    """The learning rate's shape over the run, peaking at 1; the peak rate multiplies it."""
    if name == "constant":
        return optax.constant_schedule(1.0)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps, total_steps, end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup_steps),
                                 optax.linear_schedule(1.0, 0.0, total_steps - warmup_steps)], [warmup_steps])


def lamb_excluding_biases(learning_rate, weight_decay=0.0, eps=1e-6, b1=0.9, b2=0.999):
    """LAMB as its authors' code ran it (google-research/albert, lamb_optimizer.py): biases take neither the
    weight decay nor the trust ratio (a zero-initialised bias has a norm of 0 and would barely move), built
    from optax.lamb's own parts with masks, as optax's lars masks its trust ratio."""
    def not_biases(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "bias", params)
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay, not_biases),
                       optax.masked(optax.scale_by_trust_ratio(), not_biases),
                       optax.scale_by_learning_rate(learning_rate))


def muon_dimensions(params):
    """Which arrays Muon orthogonalises, as which matrix: every conv and dense kernel (None: a bias, which
    goes to Muon's AdamW part). A conv kernel (3, 3, in, out) maps each output pixel's 3x3 patch of `in`
    channels to its `out` channels: as a matrix it is (3*3*in, out), the very matmul the patches conv
    computes, so its reduction axes are all but the last (a per-tap split would orthogonalise 9 separate
    (in, out) maps that only act together)."""
    def spec(path, leaf):
        if getattr(path[-1], "key", None) != "kernel":
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=tuple(range(leaf.ndim - 1)),
                                                  output_axis=leaf.ndim - 1)
    return jax.tree_util.tree_map_with_path(spec, params)


def muon(learning_rate, weight_decay=0.0):
    """optax's Muon on this net: Newton-Schulz-orthogonalised Nesterov momentum (optax's beta 0.95) for the
    kernels, with decoupled weight decay times the rate on them; optax's AdamW (Nesterov, no decay) for the
    biases, at the same rate."""
    return optax.contrib.muon(learning_rate, weight_decay=weight_decay, muon_weight_dimension_numbers=muon_dimensions)


def lbfgs_with_memory(memory_size: int):
    """optax's L-BFGS with its zoom line search (optax's defaults), keeping `memory_size` curvature pairs. The
    rate scales the direction the line search searches along: 1 is optax's own (the line search's step is
    taken as found), another value only moves the line search's first trial step."""
    def lbfgs(learning_rate):
        return optax.lbfgs(learning_rate, memory_size=memory_size)
    return lbfgs


class AverageState(NamedTuple):
    average: optax.Params  # the exponential moving average of the parameters


def parameter_average(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the parameters after each update (starting from the initial
    ones) in the optimiser state, so it is replicated, checkpointed and resumed with it; updates pass as
    they are. The last link of the chain: it sees the update that is applied."""
    def init(params):
        return AverageState(jax.tree.map(jnp.asarray, params))

    def update(updates, state, params):
        average = jax.tree.map(lambda a, p, u: decay * a + (1 - decay) * (p + u), state.average, params, updates)
        return updates, AverageState(average)
    return optax.GradientTransformation(init, update)


def make_optimiser(name: str, schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 1,
                   lamb_exclude_biases: bool = False, ema: float = 0.0, lbfgs_memory: int = 10):
    """optax lamb / adamw / sgd+momentum / muon / lbfgs with every rate and coefficient in the optimiser
    state; with ema, a moving average of the parameters kept there too (`averaged_params`).

    Holding them as state (inject_hyperparams), not constants, lets one compiled step serve every
    learning rate, weight decay, epsilon and momentum of a sweep. Set them with `with_hyperparams`.
    L-BFGS's update needs the loss and the function its line search evaluates (steps.py passes them).
    """
    factory = {"lamb": lamb_excluding_biases if lamb_exclude_biases else optax.lamb, "adam": optax.adamw,
               "sgd": optax.sgd, "muon": muon, "lbfgs": lbfgs_with_memory(lbfgs_memory)}[name]
    coefficient = {"sgd": {"momentum": 0.0}, "muon": {"weight_decay": 0.0}, "lbfgs": {}}.get(
        name, {"weight_decay": 0.0, "eps": 1.0})
    base = optax.inject_hyperparams(factory)(learning_rate=0.0, **coefficient)
    links = [base, optax.scale_by_schedule(schedule_shape(schedule, warmup_steps, total_steps))]
    return optax.chain(*links, *([parameter_average(ema)] if ema else []))


def line_search_info(opt_state):
    """L-BFGS's last line search (optax.ZoomLinesearchInfo: its evaluations, its decrease error), or None."""
    found = optax.tree_utils.tree_get(opt_state, "info", default=None)
    return found if hasattr(found, "num_linesearch_steps") else None


def averaged_params(state: TrainState):
    """The moving average of the parameters (--ema), or None."""
    last = state.opt_state[-1]
    return last.average if isinstance(last, AverageState) else None


def rate_in_force(config, update: int) -> float:
    """The learning rate of update number `update` (counting from 0): the peak rate times the schedule."""
    total = config.inner_steps * config.outer_steps
    return float(config.learning_rate * schedule_shape(config.schedule, config.warmup_steps, total)(update))


def with_hyperparams(state: TrainState, config) -> TrainState:
    """Sets the run's peak rate and its optimiser's coefficient in the (unreplicated) optimiser state."""
    injected = state.opt_state[0]
    values = {"learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
              "momentum": config.momentum, "eps": config.epsilon}
    hyperparams = {k: jnp.asarray(values[k], v.dtype) if k in values else v for k, v in injected.hyperparams.items()}
    return state.replace(opt_state=(injected._replace(hyperparams=hyperparams), *state.opt_state[1:]))


def create_state(model, optimiser, seed: int, image_shape) -> TrainState:
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.uint8))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optimiser)
    # Every leaf strongly typed, as the step returns it (L-BFGS's line search starts with weakly typed scalars),
    # so the step compiles once, not again after its first update.
    return state.replace(opt_state=jax.tree.map(lambda a: jnp.asarray(a, a.dtype), state.opt_state))
