"""The optimisers (optax LAMB, AdamW, SGD with momentum) with their rates in the optimiser state, and the
learning-rate schedules."""
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


def make_optimiser(name: str, schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 1):
    """optax lamb / adamw / sgd+momentum with every rate and coefficient in the optimiser state.

    Holding them as state (inject_hyperparams), not constants, lets one compiled step serve every
    learning rate, weight decay, epsilon and momentum of a sweep. Set them with `with_hyperparams`.
    """
    factory = {"lamb": optax.lamb, "adam": optax.adamw, "sgd": optax.sgd}[name]
    coefficient = {"sgd": {"momentum": 0.0}}.get(name, {"weight_decay": 0.0, "eps": 1.0})
    base = optax.inject_hyperparams(factory)(learning_rate=0.0, **coefficient)
    return optax.chain(base, optax.scale_by_schedule(schedule_shape(schedule, warmup_steps, total_steps)))


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
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimiser)
