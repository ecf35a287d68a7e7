"""Train the EuroSAT conv net with the whole (augmented) training set as every step's batch.

Run the same command on every host of a pod slice, or once on a single GPU/CPU box:
    python train.py --optimiser lamb
"""
import argparse
import functools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, NamedTuple

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax import lax

import augment
import checkpoint
import data
from model import DEFAULT_CHANNELS, DEFAULT_DENSE, ConvNet, param_count

AXIS = "devices"  # the pmap axis: every device of every host
DEFAULT_LEARNING_RATES = {"lamb": 1e-2, "adam": 1e-3, "sgd": 1e-1}


class UsageError(Exception):
    """A flag value that cannot work; its message names the flag."""


class Diverged(Exception):
    """The loss became NaN or infinite; the best params so far are kept."""


class PeerError(Exception):
    """Another process of a multi-host run cannot be reached."""


class Interrupted(Exception):
    """A stop signal ended the run; the last checkpoint on disk resumes it."""

    def __init__(self, signum: int, outer: int, checkpointed: int, output_dir: str | None):
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        where = (f"the checkpoint after outer loop {checkpointed} in {output_dir} resumes it (run the same command)"
                 if output_dir and checkpointed else "no checkpoint to resume from" + ("" if output_dir else
                                                                                     " (no --output-dir)"))
        super().__init__(f"stopped by {signal.Signals(signum).name} during outer loop {outer}; {where}")


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # a prefix of one flag must never set another
    p.error = lambda message: fail(f"{message} (see --help)")  # one line, no usage dump
    add = p.add_argument
    add("--optimiser", choices=["lamb", "adam", "sgd"], default="lamb", help="optax optimiser")
    add("--learning-rate", type=float, default=None,
        help=f"peak learning rate; default per optimiser {DEFAULT_LEARNING_RATES}")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay (lamb; adam becomes adamw)")
    add("--momentum", type=float, default=0.9, help="sgd momentum")
    add("--schedule", choices=SCHEDULES, default="constant",
        help="learning-rate shape: constant, or linear warmup then cosine or linear decay to 0 at the last step")
    add("--warmup-steps", type=int, default=0, help="warmup steps of the warmup_* schedules")
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
    add("--conv", choices=["auto", "xla", "patches"], default="auto",
        help="how the stride-2 convs are computed: xla (nn.Conv) or patches (the same function as one matmul); "
             "auto: patches on CPU, xla elsewhere (measured, see README)")
    add("--microbatch", type=int, default=0,
        help="examples per device per gradient chunk (accumulated inside the step); 0: chosen from device memory")
    add("--target-accuracy", type=float, default=0.95, help="report when validation accuracy first reaches it")
    add("--stop-at-target", action="store_true", help="stop once --target-accuracy is reached")
    add("--output-dir", default=None,
        help="where process 0 writes metrics.jsonl and best_params.msgpack, and every process a checkpoint "
             "per outer loop (on a pod: a folder every host sees); a checkpoint of the same run there resumes it")
    add("--resume", action="store_true", help="require a checkpoint in --output-dir to continue from")
    add("--keep-checkpoints", type=int, default=2, help="latest checkpoints kept, besides the best one")
    add("--eval-test", action="store_true", help="at the end, report test accuracy of the best params")
    add("--coordinator-address", default=None, help="multi-host: host:port of process 0 (not needed on TPU pods)")
    add("--num-processes", type=int, default=None, help="multi-host: number of processes")
    add("--process-id", type=int, default=None, help="multi-host: this process's index")
    add("--distributed-timeout", type=int, default=300,
        help="multi-host: seconds to wait for the coordinator at start, and for a silent process mid-run, "
             "before exiting with an error")
    return p


def fail(message: str, program: str = "train.py"):
    print(f"{program}: error: {message}", file=sys.stderr)
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
                "--synthetic-examples": args.synthetic_examples, "--keep-checkpoints": args.keep_checkpoints,
                "--distributed-timeout": args.distributed_timeout}
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
    if not 0 <= args.warmup_steps < args.inner_steps * args.outer_steps:
        raise UsageError(f"--warmup-steps must be in [0, total steps {args.inner_steps * args.outer_steps}), "
                         f"got {args.warmup_steps}")
    if args.microbatch < 0:
        raise UsageError(f"--microbatch must be >= 0 (0 = automatic), got {args.microbatch}")
    if not 0 < args.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    if args.dataset == "folder" and not args.data_dir:
        raise UsageError("--dataset folder needs --data-dir PATH")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir} exists and is not a folder")
    if args.resume and not args.output_dir:
        raise UsageError("--resume needs --output-dir, the folder holding the checkpoint")
    multihost = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in multihost) and any(v is None for v in multihost):
        raise UsageError("--coordinator-address, --num-processes and --process-id go together")
    if args.num_processes is not None:
        if args.num_processes < 1:
            raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id {args.process_id} is outside 0..{args.num_processes - 1}")
        host, _, port = args.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--coordinator-address {args.coordinator_address!r} is not host:port")


# ----------------------------------------------------------------------------- model and optimiser

SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")


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
    learning rate, weight decay and momentum of a sweep. Set them with `with_hyperparams`.
    """
    factory = {"lamb": optax.lamb, "adam": optax.adamw, "sgd": optax.sgd}[name]
    coefficient = {"sgd": {"momentum": 0.0}}.get(name, {"weight_decay": 0.0})
    base = optax.inject_hyperparams(factory)(learning_rate=0.0, **coefficient)
    return optax.chain(base, optax.scale_by_schedule(schedule_shape(schedule, warmup_steps, total_steps)))


def with_hyperparams(state: TrainState, args) -> TrainState:
    """Sets the run's peak rate and its optimiser's coefficient in the (unreplicated) optimiser state."""
    injected = state.opt_state[0]
    values = {"learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "momentum": args.momentum}
    hyperparams = {k: jnp.asarray(values[k], v.dtype) if k in values else v for k, v in injected.hyperparams.items()}
    return state.replace(opt_state=(injected._replace(hyperparams=hyperparams), *state.opt_state[1:]))


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


def step_agreeing_to_stop(state, images, labels, mask, stop_signal, **step_kwargs):
    """train_step, plus the largest stop signal any process passed in: every process reads the same value
    after the same step, so all of them stop together (a process that stopped alone would leave the
    others waiting at the next all-reduce forever)."""
    state, loss = train_step(state, images, labels, mask, **step_kwargs)
    return state, loss, lax.pmax(stop_signal, AXIS)


def evaluation_counts(params, images, labels, mask, stride, *, apply_fn, chunk):
    """(correctly classified, with a non-finite logit) real examples over all devices; `stride` 8 picks the
    un-augmented images. The second count catches params that the last update blew up, which the loss
    (computed before that update) cannot show."""
    def count(x, y, m):
        logits = apply_fn({"params": params}, x)  # (n, classes)
        predictions = jnp.argmax(logits, axis=-1)  # (n,)
        return jnp.sum((predictions == y) * m), jnp.sum(~jnp.all(jnp.isfinite(logits), axis=-1) * m)
    return lax.psum(summed_over_chunks(count, (images[::stride], labels[::stride], mask[::stride]), chunk), AXIS)


# ----------------------------------------------------------------------------- setup helpers

_distributed_started = False


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Raises PeerError unless the coordinator's port accepts a connection within `timeout` seconds
    (jax itself would abort the process with a stack trace)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise PeerError(f"cannot reach the coordinator (process 0) at {address} within "
                                f"--distributed-timeout {timeout}s: {error}") from None
            time.sleep(0.5)


def init_distributed(args) -> None:
    """Joins the other processes (once per process); an unreachable coordinator or a process that stops
    answering ends every process with an error after --distributed-timeout seconds, never a silent hang."""
    global _distributed_started
    if _distributed_started:
        return
    timeouts = dict(initialization_timeout=args.distributed_timeout,
                    heartbeat_timeout_seconds=args.distributed_timeout)
    if args.coordinator_address:
        if args.process_id != 0:  # process 0 runs the coordinator; the others first check they can reach it
            wait_for_coordinator(args.coordinator_address, args.distributed_timeout)
        print(f"process {args.process_id}: joining {args.num_processes} processes at {args.coordinator_address} "
              f"(up to {args.distributed_timeout}s)", flush=True)
        # On CPU clusters the collectives need gloo; the setting is ignored by other backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, **timeouts)
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize(**timeouts)  # a Cloud TPU pod slice describes itself
    _distributed_started = True


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


CPU_MICROBATCH = 32  # measured fastest on the CPU with patch convs (README, Speed): the chunk stays in cache


def choose_conv(args) -> str:
    """--conv, or by backend: patch matmuls on the CPU (1.7x nn.Conv there), nn.Conv elsewhere (faster on GPU)."""
    if args.conv != "auto":
        return args.conv
    return "patches" if jax.default_backend() == "cpu" else "xla"


def choose_microbatch(args, per_device: int, image_size: int) -> int:
    """--microbatch; on the CPU with patch convs a cache-sized chunk; else the largest chunk whose
    activations take a quarter of a device's memory."""
    if args.microbatch:
        return min(args.microbatch, per_device)
    if jax.default_backend() == "cpu" and choose_conv(args) == "patches":
        return min(CPU_MICROBATCH, per_device)
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

class Prepared(NamedTuple):
    """What every run of a process shares: the data on the devices and its counts."""
    train_data: tuple  # images (devices, per_device, H, W, C) uint8, labels, mask
    val_data: tuple
    train_count: int  # real examples over all hosts, before augmentation
    val_count: int
    stride: int  # 8 when train_data holds the dihedral forms, else 1
    num_classes: int
    load: Callable  # name -> this process's data.Split
    log: Callable


def prepare(args) -> Prepared:
    """Start the processes, load this process's data and put it, augmented, on the devices."""
    init_distributed(args)
    classes = data.num_classes(args)
    log = functools.partial(print, flush=True) if jax.process_index() == 0 else (lambda *a, **k: None)
    log(f"jax {jax.__version__} {jax.default_backend()}: {jax.process_count()} process(es), "
        f"{jax.device_count()} devices ({jax.local_device_count()} local: {jax.local_devices()[0].device_kind})")

    def load(name: str) -> data.Split:
        split = data.load_split(args, name, process_index=jax.process_index(), process_count=jax.process_count())
        return data.check_labels(split, classes, name)

    train_data, train_count = prepare_split(load("train"), "train", not args.no_augment, log)
    val_data, val_count = prepare_split(load("validation"), "validation", False, log)
    stride = 1 if args.no_augment else augment.NUM_TRANSFORMS
    return Prepared(train_data, val_data, train_count, val_count, stride, classes, load, log)


def build_programs(args, prepared: Prepared) -> dict:
    """The model, optimiser and pmapped functions of a run. Runs that differ only in hyperparameter
    values (rate, decay, momentum, seed) get equal keys, so a sweep compiles them once."""
    inner_mode = args.inner_loop if args.inner_loop != "auto" else (
        "python" if jax.default_backend() == "cpu" else "compiled")
    image_shape = prepared.train_data[0].shape[2:]  # (H, W, C)
    model = ConvNet(args.channels, args.dense, prepared.num_classes, jnp.dtype(args.dtype), choose_conv(args))
    total_steps = args.inner_steps * args.outer_steps
    optimiser = make_optimiser(args.optimiser, args.schedule, args.warmup_steps, total_steps)
    microbatch = choose_microbatch(args, prepared.train_data[0].shape[1], image_shape[0])
    step_kwargs = dict(example_count=float(prepared.train_count * prepared.stride), microbatch=microbatch)
    if inner_mode == "compiled":
        loop = jax.pmap(functools.partial(inner_loop, steps=args.inner_steps, **step_kwargs),
                        axis_name=AXIS, donate_argnums=0)

        def inner(state, *batch, stop):  # one program: a stop request waits for its end
            return loop(state, *batch)
    else:
        step = jax.pmap(functools.partial(step_agreeing_to_stop, **step_kwargs), axis_name=AXIS,
                        donate_argnums=0)

        def inner(state, *batch, stop):
            """The inner steps, or None when a stop signal came before they were all done."""
            loss, agreed = None, None
            for _ in range(args.inner_steps):
                if jax.process_count() == 1 and stop.received:  # alone, no need to wait for an agreement
                    stop.agreed = stop.received
                    return None
                state, next_loss, next_agreed = step(state, *batch, stop.flags())
                if agreed is not None and int(agreed[0]):  # waits for the step before: one step queued at most
                    next_loss.block_until_ready()  # every process launched this step; let it end everywhere
                    stop.agreed = int(agreed[0])
                    return None
                loss, agreed = next_loss, next_agreed
            return state, loss
    evaluate = jax.pmap(functools.partial(evaluation_counts, apply_fn=model.apply, chunk=microbatch),
                        axis_name=AXIS, static_broadcasted_argnums=4)
    return dict(model=model, optimiser=optimiser, inner=inner, evaluate=evaluate, inner_mode=inner_mode,
                conv=model.conv, microbatch=microbatch, image_shape=image_shape)


def program_key(args) -> tuple:
    return (args.optimiser, args.schedule, args.warmup_steps, args.inner_steps, args.outer_steps,
            args.channels, args.dense, args.dtype, args.conv, args.microbatch, args.inner_loop)


class StopSignals:
    """Turns SIGTERM and SIGINT (what a preemption or Ctrl-C sends) into a request the run acts on at the
    next step boundary, so it can leave a complete checkpoint behind. A second signal stops at once.

    On a pod the signal reaches the processes at different moments, so no process stops on its own
    word: `received` is this process's request, `agreed` the largest signal all processes passed on at
    the same step (or outer loop) boundary, which is what they all act on."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.received, self.agreed = None, None
        self.previous = {}
        self._agree = jax.pmap(lambda signum: lax.pmax(signum, AXIS), axis_name=AXIS)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self.record) for s in self.SIGNALS}
        return self

    def record(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def flags(self) -> np.ndarray:
        """This process's request for each of its devices (0: none), for a step to agree on."""
        return np.full(jax.local_device_count(), self.received or 0, np.int32)

    def agree(self) -> int | None:
        """Every process together (a collective): the largest signal any of them received, or None."""
        self.agreed = int(self._agree(self.flags())[0]) or None
        return self.agreed

    def __exit__(self, *exception):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resume_point(args, checkpoints) -> dict | None:
    """The latest checkpoint's progress if this run continues it; refuses a checkpoint of another run."""
    progress = checkpoint.read_progress(checkpoints) if checkpoints else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.int64(progress["outer"] if progress else -1),
                                     f"processes see different checkpoints in {args.output_dir}: "
                                     "--output-dir must be a folder every host reads and writes")
    if progress is None:
        if args.resume:
            raise UsageError(f"--resume: no checkpoint in {args.output_dir}")
        return None
    refuse_other_run(progress["run"], args)
    return progress


def refuse_other_run(saved_definition: dict, args) -> None:
    """UsageError naming each flag in which `args` defines another run than the one saved."""
    changed = checkpoint.differences(saved_definition, args)
    if changed:
        raise UsageError(f"{args.output_dir} holds a checkpoint of a different run ({'; '.join(changed)}); "
                         "use another --output-dir, or delete that one to start over")


def target_reached(history: list[dict], target_accuracy: float) -> dict | None:
    """The first outer loop whose validation accuracy reached the target, recomputed from the records
    (the target is a reporting setting: a resumed run may ask for another)."""
    return next(({k: h[k] for k in ("outer", "step", "train_seconds", "elapsed_seconds")} for h in history
                 if h["validation_accuracy"] >= target_accuracy), None)


def finished(args, progress: dict) -> bool:
    """Whether the run has nothing left to do: all its outer loops, or the target with --stop-at-target."""
    return progress["outer"] >= args.outer_steps or bool(
        args.stop_at_target and target_reached(progress["history"], args.target_accuracy))


class MetricsLog:
    """Process 0's metrics.jsonl: a header line, then a line per outer loop, flushed at once so nothing
    measured is lost. On resume the file is cut back to the checkpoint's outer loop (later lines are redone)."""

    def __init__(self, path: str | None, header: dict, resumed_after: int | None):
        self.file = None
        if path is None:
            return
        lines = [json.dumps(header)]
        if resumed_after is not None and os.path.exists(path):
            with open(path) as f:
                earlier = [json.loads(line) for line in f if line.strip()]
            lines = [json.dumps(r) for r in earlier if r.get("outer", 0) <= resumed_after and "summary" not in r]
            # The resumed run's own config (e.g. more outer loops): readers take the last config line.
            lines.append(json.dumps({"resumed_after_outer": resumed_after, "config": header["config"],
                                     "devices": jax.device_count(), "processes": jax.process_count(),
                                     "time": time.time()}))
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class Shared:
    """What the runs of one process share: the data on the devices, loaded at the first run that needs it
    (a sweep of finished runs loads nothing), and the compiled programs by program_key."""

    def __init__(self, args):
        self.args, self._prepared, self.programs = args, None, {}

    def prepared(self) -> Prepared:
        if self._prepared is None:
            self._prepared = prepare(self.args)
        return self._prepared


def run(args, shared: Shared | None = None) -> dict:
    """One training run; a sweep passes the data and the compiled programs it shares between runs."""
    shared = shared or Shared(args)
    init_distributed(args)
    with StopSignals() as stop:  # until the last checkpoint is written: a signal then must not kill the write
        return run_with_checkpoints(args, shared, stop)


def run_with_checkpoints(args, shared: Shared, stop: StopSignals) -> dict:
    checkpoints = checkpoint.manager(args.output_dir, args.keep_checkpoints) if args.output_dir else None
    try:
        resumed = resume_point(args, checkpoints)  # before loading data: a refusal should come at once
        if resumed and finished(args, resumed):
            if jax.process_index() == 0:
                print(f"{args.output_dir}: finished earlier (outer loop {resumed['outer']} of {args.outer_steps}"
                      + (", target reached" if resumed["outer"] < args.outer_steps else "") + "); nothing to do",
                      flush=True)
            if not args.eval_test:  # nothing to compute: no data to load
                return summarise(args, None, None, None, resumed, lambda *a: None)
        prepared = shared.prepared()
        if program_key(args) not in shared.programs:
            shared.programs[program_key(args)] = build_programs(args, prepared)
        return outer_loops(args, prepared, shared.programs[program_key(args)], checkpoints, resumed, stop)
    finally:
        if checkpoints:
            checkpoints.close()  # waits for a save still being written


def initial_progress(args) -> dict:
    return {"outer": 0, "best": {"validation_accuracy": -1.0, "outer": None, "step": None}, "history": [],
            "loss": None, "train_seconds": 0.0, "elapsed_seconds": 0.0, "run": checkpoint.run_definition(args)}


def start(args, prepared: Prepared, p: dict, checkpoints, resumed: dict | None):
    """(replicated state, best params, progress) fresh or from the checkpoint, and the metrics log to match."""
    log, is_main = prepared.log, jax.process_index() == 0
    state = with_hyperparams(create_state(p["model"], p["optimiser"], args.seed, p["image_shape"]), args)
    log(f"model: {param_count(state.params):,} params, {args.dtype}; {args.optimiser} lr {args.learning_rate:g} "
        f"({args.schedule}); {p['conv']} convs; inner loop {p['inner_mode']}; "
        f"microbatch {p['microbatch']} of {prepared.train_data[0].shape[1]} per device")
    if resumed:
        state, best_params, progress = checkpoint.restore(checkpoints, state, state.params)
        log(f"resuming after outer loop {progress['outer']} from {checkpoints.directory}")
    else:
        state = flax.jax_utils.replicate(state)
        best_params, progress = state.params, initial_progress(args)
    header = {"config": dict(vars(args)), "inner_loop": p["inner_mode"], "conv": p["conv"],
              "microbatch": p["microbatch"], "devices": jax.device_count(), "processes": jax.process_count(),
              "backend": jax.default_backend(), "train_examples": prepared.train_count,
              "validation_examples": prepared.val_count, "examples_per_step": prepared.train_count * prepared.stride,
              "jax": jax.__version__, "run": progress["run"]}
    if is_main and args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    write = is_main and args.output_dir and not finished(args, progress)  # a finished run's files stay as they are
    metrics = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl") if write else None,
                         header, progress["outer"] if resumed else None)
    return state, best_params, progress, metrics


def outer_line(args, record: dict, best: dict, first: bool) -> str:
    return (f"outer {record['outer']}/{args.outer_steps} step {record['step']}: loss {record['loss']:.4f} "
            f"train acc {record['train_accuracy']:.4f} val acc {record['validation_accuracy']:.4f} "
            f"(best {best['validation_accuracy']:.4f} @ outer {best['outer']}) | {record['inner_seconds']:.2f}s "
            f"{record['images_per_second']:,.0f} img/s | elapsed {record['elapsed_seconds']:.1f}s"
            + (" (includes compilation)" if first else ""))


def outer_loops(args, prepared: Prepared, p: dict, checkpoints, resumed: dict | None, stop: StopSignals) -> dict:
    """The outer loops (inner loop, validation, metrics line, checkpoint), then the summary."""
    log, is_main = prepared.log, jax.process_index() == 0
    step_examples = prepared.train_count * prepared.stride
    state, best_params, progress, metrics = start(args, prepared, p, checkpoints, resumed)
    try:
        best, loss = progress["best"], progress["loss"]
        first_outer = progress["outer"] + 1
        started = time.perf_counter() - progress["elapsed_seconds"]
        while not finished(args, progress):
            outer = progress["outer"] + 1
            if stop.agree():  # every process takes part, so all stop before the same outer loop
                raise Interrupted(stop.agreed, outer, progress["outer"], args.output_dir)
            tick = time.perf_counter()
            done = p["inner"](state, *prepared.train_data, stop=stop)
            if done is None:  # a stop signal came mid-loop: its steps are dropped, the checkpoint stands
                raise Interrupted(stop.agreed, outer, progress["outer"], args.output_dir)
            state, loss = done
            loss = float(loss[0])  # waits for the inner loop to finish
            inner_seconds = time.perf_counter() - tick
            val_correct, val_broken = (int(c[0]) for c in p["evaluate"](state.params, *prepared.val_data, 1))
            train_correct, train_broken = (int(c[0]) for c in p["evaluate"](state.params, *prepared.train_data,
                                                                             prepared.stride))
            if not math.isfinite(loss) or val_broken or train_broken:
                metrics.write({"outer": outer, "diverged": True, "loss": str(loss)})
                raise Diverged(f"{'loss is ' + str(loss) if not math.isfinite(loss) else 'logits are not finite'} "
                               f"after outer loop {outer} (step {outer * args.inner_steps}); last finite loss "
                               f"{progress['loss']}; " + (
                                   f"best validation accuracy {best['validation_accuracy']:.4f} at outer "
                                   f"{best['outer']} (kept)" if best["outer"] else "no validation before it"))
            progress["train_seconds"] += inner_seconds
            val_accuracy, train_accuracy = val_correct / prepared.val_count, train_correct / prepared.train_count
            record = {"outer": outer, "step": outer * args.inner_steps, "loss": loss,
                      "train_accuracy": train_accuracy, "validation_accuracy": val_accuracy,
                      "inner_seconds": inner_seconds,
                      "images_per_second": step_examples * args.inner_steps / inner_seconds,
                      "train_seconds": progress["train_seconds"], "elapsed_seconds": time.perf_counter() - started}
            if val_accuracy > best["validation_accuracy"]:
                best = {"validation_accuracy": val_accuracy, "outer": outer, "step": record["step"]}
                best_params = jax.tree.map(jnp.copy, state.params)  # the state's own buffers are donated
                if is_main and args.output_dir:
                    write_params(os.path.join(args.output_dir, "best_params.msgpack"),
                                 jax.device_get(flax.jax_utils.unreplicate(best_params)))
            record["best_validation_accuracy"] = best["validation_accuracy"]
            log(outer_line(args, record, best, first=outer == first_outer))
            metrics.write(record)  # before the checkpoint: a resume may redo a line, never lose one
            progress["history"].append({k: record[k] for k in ("outer", "step", "validation_accuracy",
                                                               "train_seconds", "elapsed_seconds")})
            progress.update(outer=outer, best=best, loss=loss, elapsed_seconds=record["elapsed_seconds"])
            if checkpoints:
                checkpoint.save(checkpoints, state, best_params, progress, val_accuracy)
            if args.stop_at_target and finished(args, progress) and outer < args.outer_steps:
                log(f"stopping: reached --target-accuracy {args.target_accuracy}")
        summary = summarise(args, prepared, p, best_params, progress, log)
        metrics.write({"summary": summary})
        return summary
    finally:
        metrics.close()


def summarise(args, prepared: Prepared | None, p: dict | None, best_params, progress: dict, log) -> dict:
    best, target = progress["best"], target_reached(progress["history"], args.target_accuracy)
    summary = {"best": best, "target": target, "target_accuracy": args.target_accuracy,
               "final_loss": progress["loss"], "train_seconds": progress["train_seconds"]}
    if target:
        log(f"reached validation accuracy {args.target_accuracy} at outer {target['outer']} (step "
            f"{target['step']}) after {target['train_seconds']:.1f}s of training")
    else:
        log(f"did not reach validation accuracy {args.target_accuracy}; best {best['validation_accuracy']:.4f}")
    if args.eval_test:
        test_data, test_count = prepare_split(prepared.load("test"), "test", False, log)
        summary["test_accuracy"] = int(p["evaluate"](best_params, *test_data, 1)[0][0]) / test_count
        log(f"test accuracy of the best params (outer {best['outer']}): {summary['test_accuracy']:.4f}")
    return summary


def exit_on_failure(program: str, fn: Callable, *fn_args):
    """fn(*fn_args); a failure the project knows ends the process with one line and its exit code:
    2 bad flag or data, 3 diverged, 4 unreachable coordinator, 128 + signal when stopped by one."""
    try:
        return fn(*fn_args)
    except (UsageError, data.DataError) as error:
        fail(str(error), program)
    except Diverged as error:
        print(f"{program}: diverged: {error}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as error:
        print(f"{program}: {error}", file=sys.stderr)
        # The checkpoint is complete; the other processes of a pod may get their SIGTERM while this one shuts
        # down (Python restores the default, fatal, handler then): ignored, so it still exits 128 + signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(error.exit_code)
    except PeerError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(4)


def main(argv=None) -> None:
    exit_on_failure("train.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
