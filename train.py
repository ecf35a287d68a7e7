"""Train the EuroSAT conv net with the whole (augmented) training set as every step's batch.

Run the same command on every host of a pod slice, or once on a single GPU/CPU box:
    python train.py --optimiser lamb
"""
import argparse
import functools
import json
import math
import os
import sys
import time

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax import lax

import augment
import data
from model import DEFAULT_CHANNELS, DEFAULT_DENSE, ConvNet, param_count

AXIS = "devices"  # the pmap axis: every device of every host
DEFAULT_LEARNING_RATES = {"lamb": 1e-2, "adam": 1e-3, "sgd": 1e-1}


class UsageError(Exception):
    """A flag value that cannot work; its message names the flag."""


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: fail(f"{message} (see --help)")  # one line, no usage dump
    add = p.add_argument
    add("--optimiser", choices=["lamb", "adam", "sgd"], default="lamb", help="optax optimiser")
    add("--learning-rate", type=float, default=None,
        help=f"peak learning rate; default per optimiser {DEFAULT_LEARNING_RATES}")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay (lamb; adam becomes adamw)")
    add("--momentum", type=float, default=0.9, help="sgd momentum")
    add("--inner-steps", type=int, default=100, help="update steps between validation checks")
    add("--outer-steps", type=int, default=13, help="validation checks (outer loops)")
    add("--inner-loop", choices=["auto", "compiled", "python"], default="auto",
        help="compiled: the inner steps as one program (fori_loop); python: a host loop of pmapped steps; "
             "auto: python on CPU, compiled elsewhere (measured, see README)")
    add("--seed", type=int, default=0, help="parameter initialisation seed")
    add("--dataset", choices=["tfds", "folder", "synthetic"], default="tfds",
        help="tfds: eurosat/rgb through tensorflow-datasets; folder: an extracted EuroSAT image folder; "
             "synthetic: generated class-dependent images")
    add("--data-dir", default=None, help="tfds: TFDS data_dir; folder: the folder with one sub-folder per class")
    add("--manual-dir", default=None, help="tfds: folder holding a downloaded EuroSAT.zip (offline use)")
    add("--synthetic-examples", type=int, default=2000, help="synthetic: total examples over all splits")
    add("--image-size", type=int, default=64, help="synthetic: image side in pixels")
    add("--train-examples", type=int, default=None, help="use the first N examples of the training split")
    add("--no-augment", action="store_true", help="train on the images as they are, without the 8 dihedral forms")
    add("--channels", default=",".join(map(str, DEFAULT_CHANNELS)), help="conv widths, comma separated")
    add("--dense", type=int, default=DEFAULT_DENSE, help="hidden dense width")
    add("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (params stay float32)")
    add("--microbatch", type=int, default=0,
        help="examples per device per gradient chunk (accumulated inside the step); 0: chosen from device memory")
    add("--target-accuracy", type=float, default=0.95, help="report when validation accuracy first reaches it")
    add("--stop-at-target", action="store_true", help="stop once --target-accuracy is reached")
    add("--output-dir", default=None, help="where process 0 writes metrics.jsonl and best_params.msgpack")
    add("--eval-test", action="store_true", help="at the end, report test accuracy of the best params")
    add("--coordinator-address", default=None, help="multi-host: host:port of process 0 (not needed on TPU pods)")
    add("--num-processes", type=int, default=None, help="multi-host: number of processes")
    add("--process-id", type=int, default=None, help="multi-host: this process's index")
    return p


def fail(message: str):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UsageError(f"--channels {args.channels!r} is not a comma-separated list of integers") from None
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.optimiser]
    check_args(args)
    return args


def check_args(args) -> None:
    """Reject impossible settings before any data is loaded or device touched."""
    positive = {"--learning-rate": args.learning_rate, "--inner-steps": args.inner_steps,
                "--outer-steps": args.outer_steps, "--dense": args.dense, "--image-size": args.image_size,
                "--synthetic-examples": args.synthetic_examples}
    if args.train_examples is not None:
        positive["--train-examples"] = args.train_examples
    for flag, value in positive.items():
        if not value > 0 or not math.isfinite(value):
            raise UsageError(f"{flag} must be positive, got {value}")
    if min(args.channels) <= 0:
        raise UsageError(f"--channels must all be positive, got {args.channels}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.microbatch < 0:
        raise UsageError(f"--microbatch must be >= 0 (0 = automatic), got {args.microbatch}")
    if not 0 < args.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    if args.dataset == "folder" and not args.data_dir:
        raise UsageError("--dataset folder needs --data-dir PATH")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir} exists and is not a folder")
    multihost = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in multihost) and any(v is None for v in multihost):
        raise UsageError("--coordinator-address, --num-processes and --process-id go together")
    if args.num_processes is not None:
        if args.num_processes < 1:
            raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id {args.process_id} is outside 0..{args.num_processes - 1}")


# ----------------------------------------------------------------------------- model and optimiser

def make_optimiser(name: str, learning_rate: float, weight_decay: float, momentum: float):
    if name == "lamb":
        return optax.lamb(learning_rate, weight_decay=weight_decay)
    if name == "adam":
        return optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)
    return optax.sgd(learning_rate, momentum=momentum)


def create_state(model, optimiser, seed: int, image_shape) -> TrainState:
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.uint8))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimiser)


# ----------------------------------------------------------------------------- the step

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


def loss_sum(params, apply_fn, images, labels, mask):
    logits = apply_fn({"params": params}, images)  # (n, classes)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask)


def train_step(state, images, labels, mask, *, example_count, microbatch):
    """One update with the gradient of the mean loss over the global batch (this device holds a shard)."""
    def loss_and_grads(x, y, m):
        return jax.value_and_grad(loss_sum)(state.params, state.apply_fn, x, y, m)

    local_loss, local_grads = summed_over_chunks(loss_and_grads, (images, labels, mask), microbatch)
    # Sums from every device of every host over the global count: the same step on 1 device or 256.
    loss, grads = jax.tree.map(lambda s: lax.psum(s, AXIS) / example_count, (local_loss, local_grads))
    return state.apply_gradients(grads=grads), loss


def inner_loop(state, images, labels, mask, *, steps, **step_kwargs):
    """`steps` updates as one program; returns the new state and the loss before the last update."""
    def body(_, carry):
        return train_step(carry[0], images, labels, mask, **step_kwargs)
    return lax.fori_loop(0, steps, body, (state, jnp.zeros((), jnp.float32)))


def correct_count(params, images, labels, mask, stride, *, apply_fn, chunk):
    """Correctly classified real examples over all devices; `stride` 8 picks the un-augmented images."""
    def count(x, y, m):
        predictions = jnp.argmax(apply_fn({"params": params}, x), axis=-1)  # (n,)
        return jnp.sum((predictions == y) * m)
    return lax.psum(summed_over_chunks(count, (images[::stride], labels[::stride], mask[::stride]), chunk), AXIS)


# ----------------------------------------------------------------------------- setup helpers

def init_distributed(args) -> None:
    if args.coordinator_address:
        # On CPU clusters the collectives need gloo; the setting is ignored by other backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()  # a Cloud TPU pod slice describes itself


def device_memory_bytes() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // jax.local_device_count()  # emulated CPU devices share the host's memory


def activation_bytes_per_example(image_size: int, channels, dtype_bytes: int) -> int:
    """What backprop keeps per example: conv outputs and GELU inputs/outputs of each layer, with margin."""
    values, side = 3 * image_size ** 2, image_size
    for width in channels:
        side = -(-side // 2)
        values += 3 * width * side * side
    return 2 * values * dtype_bytes


def choose_microbatch(args, per_device: int, image_size: int) -> int:
    """--microbatch, or the largest chunk whose activations take a quarter of a device's memory."""
    if args.microbatch:
        return min(args.microbatch, per_device)
    dtype_bytes = 2 if args.dtype == "bfloat16" else 4
    fits = device_memory_bytes() // 4 // activation_bytes_per_example(image_size, args.channels, dtype_bytes)
    return max(1, min(per_device, fits))


def gather_counts(count: int) -> np.ndarray:
    """Every process's local example count, in process order."""
    if jax.process_count() == 1:
        return np.array([count])
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.int64(count))).reshape(-1)


def on_devices(*arrays):
    """Shard the leading (device) axis of host arrays over this host's devices, as pmap expects."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    sharding = jax.NamedSharding(mesh, jax.P(AXIS))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def prepare_split(split: data.Split, name: str, augmented: bool, log):
    """This host's examples padded to a common per-device count (the same on every host) and placed."""
    counts = gather_counts(len(split.labels))
    total = int(counts.sum())
    if total < jax.device_count():
        raise data.DataError(f"the {name} split has {total} examples, fewer than the {jax.device_count()} devices")
    devices = jax.local_device_count()
    per_device = -(-int(counts.max()) // devices)
    padding = jax.device_count() * per_device - total
    images, labels, mask = on_devices(*data.pad_and_shard(split, devices, per_device))
    if augmented:
        images, labels, mask = augment.expand_sharded(images, labels, mask)  # (devices, 8 * per_device, ...)
    log(f"{name}: {total} examples ({' + '.join(map(str, counts))} by process), {per_device} per device, "
        f"{padding} padding (masked out)" + (f", x{augment.NUM_TRANSFORMS} augmented = "
                                             f"{total * augment.NUM_TRANSFORMS} per step" if augmented else ""))
    return (images, labels, mask), total


def write_params(path: str, params) -> None:
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    os.replace(temporary, path)  # a crash mid-write leaves the previous file whole


# ----------------------------------------------------------------------------- the run

def run(args) -> dict:
    init_distributed(args)
    is_main = jax.process_index() == 0
    log = functools.partial(print, flush=True) if is_main else (lambda *a, **k: None)
    backend = jax.default_backend()
    inner_mode = args.inner_loop if args.inner_loop != "auto" else ("python" if backend == "cpu" else "compiled")
    log(f"jax {jax.__version__} {backend}: {jax.process_count()} process(es), {jax.device_count()} devices "
        f"({jax.local_device_count()} local: {jax.local_devices()[0].device_kind})")

    load = functools.partial(data.load_split, args, process_index=jax.process_index(),
                             process_count=jax.process_count())
    train_data, train_count = prepare_split(load("train"), "train", not args.no_augment, log)
    val_data, val_count = prepare_split(load("validation"), "validation", False, log)
    stride = 1 if args.no_augment else augment.NUM_TRANSFORMS
    step_examples = train_count * stride
    image_shape = train_data[0].shape[2:]  # (H, W, C)

    model = ConvNet(args.channels, args.dense, data.num_classes(args), jnp.dtype(args.dtype))
    optimiser = make_optimiser(args.optimiser, args.learning_rate, args.weight_decay, args.momentum)
    state = flax.jax_utils.replicate(create_state(model, optimiser, args.seed, image_shape))
    microbatch = choose_microbatch(args, train_data[0].shape[1], image_shape[0])
    log(f"model: {param_count(state.params) // jax.local_device_count():,} params, {args.dtype}; "
        f"{args.optimiser} lr {args.learning_rate:g}; inner loop {inner_mode}; "
        f"microbatch {microbatch} of {train_data[0].shape[1]} per device")

    step_kwargs = dict(example_count=float(step_examples), microbatch=microbatch)
    if inner_mode == "compiled":
        inner = jax.pmap(functools.partial(inner_loop, steps=args.inner_steps, **step_kwargs),
                         axis_name=AXIS, donate_argnums=0)
    else:
        step = jax.pmap(functools.partial(train_step, **step_kwargs), axis_name=AXIS, donate_argnums=0)

        def inner(state, *batch):
            for _ in range(args.inner_steps):
                state, loss = step(state, *batch)
            return state, loss
    evaluate = jax.pmap(functools.partial(correct_count, apply_fn=model.apply, chunk=microbatch),
                        axis_name=AXIS, static_broadcasted_argnums=4)

    metrics_file = None
    if is_main and args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")
        header = {"config": {k: v for k, v in vars(args).items()}, "inner_loop": inner_mode,
                  "microbatch": microbatch, "devices": jax.device_count(), "processes": jax.process_count(),
                  "backend": backend, "train_examples": train_count, "validation_examples": val_count,
                  "examples_per_step": step_examples, "jax": jax.__version__}
        metrics_file.write(json.dumps(header) + "\n")
        metrics_file.flush()

    best = {"validation_accuracy": -1.0, "outer": None, "step": None}
    target = None
    train_seconds, started = 0.0, time.perf_counter()
    for outer in range(1, args.outer_steps + 1):
        tick = time.perf_counter()
        state, loss = inner(state, *train_data)
        loss = float(loss[0])  # waits for the inner loop to finish
        inner_seconds = time.perf_counter() - tick
        train_seconds += inner_seconds
        val_accuracy = int(evaluate(state.params, *val_data, 1)[0]) / val_count
        train_accuracy = int(evaluate(state.params, *train_data, stride)[0]) / train_count
        record = {"outer": outer, "step": outer * args.inner_steps, "loss": loss,
                  "train_accuracy": train_accuracy, "validation_accuracy": val_accuracy,
                  "inner_seconds": inner_seconds, "images_per_second": step_examples * args.inner_steps / inner_seconds,
                  "train_seconds": train_seconds, "elapsed_seconds": time.perf_counter() - started}
        if val_accuracy > best["validation_accuracy"]:
            best = {"validation_accuracy": val_accuracy, "outer": outer, "step": record["step"]}
            if is_main and args.output_dir:
                write_params(os.path.join(args.output_dir, "best_params.msgpack"),
                             jax.device_get(flax.jax_utils.unreplicate(state.params)))
            best_params = jax.tree.map(lambda x: x.copy(), state.params)
        if target is None and val_accuracy >= args.target_accuracy:
            target = {"outer": outer, "step": record["step"], "train_seconds": train_seconds,
                      "elapsed_seconds": record["elapsed_seconds"]}
        record["best_validation_accuracy"] = best["validation_accuracy"]
        log(f"outer {outer}/{args.outer_steps} step {record['step']}: loss {loss:.4f} "
            f"train acc {train_accuracy:.4f} val acc {val_accuracy:.4f} (best {best['validation_accuracy']:.4f} "
            f"@ outer {best['outer']}) | {inner_seconds:.2f}s {record['images_per_second']:,.0f} img/s "
            f"| elapsed {record['elapsed_seconds']:.1f}s" + (" (includes compilation)" if outer == 1 else ""))
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if target is not None and args.stop_at_target:
            log(f"stopping: reached --target-accuracy {args.target_accuracy}")
            break

    summary = {"best": best, "target": target, "target_accuracy": args.target_accuracy,
               "final_loss": loss, "train_seconds": train_seconds}
    if target:
        log(f"reached validation accuracy {args.target_accuracy} at outer {target['outer']} (step "
            f"{target['step']}) after {target['train_seconds']:.1f}s of training")
    else:
        log(f"did not reach validation accuracy {args.target_accuracy}; best {best['validation_accuracy']:.4f}")
    if args.eval_test:
        test_data, test_count = prepare_split(load("test"), "test", False, log)
        summary["test_accuracy"] = int(evaluate(best_params, *test_data, 1)[0]) / test_count
        log(f"test accuracy of the best params (outer {best['outer']}): {summary['test_accuracy']:.4f}")
    if metrics_file:
        metrics_file.write(json.dumps({"summary": summary}) + "\n")
        metrics_file.close()
    return summary


def main(argv=None) -> None:
    try:
        args = parse_args(argv)
        run(args)
    except (UsageError, data.DataError) as error:
        fail(str(error))


if __name__ == "__main__":
    main()
