"""Benchmark the train step: images/s, step and compile time, achieved FLOP/s against the machine's peak.

    python bench.py --batch 2048 --devices 8 --compare          # CPU, 8 emulated devices
    python bench.py --batch 172800 --dtype bfloat16             # one GPU, the blog's batch

Times the same pmapped step and inner loop train.py runs, on random uint8 images made with NumPy on the
host and placed on the devices. `--compare` also times a reference written the straightforward way
(float32 images, per-device mean gradients averaged over the devices with `pmean`, a Python loop of
pmapped steps; the original psum'd those means, which differs only by the device count as a factor)
so that speed-ups are ratios from one run. Prints a table; `--json PATH` also writes the figures.
"""
import argparse
import functools
import json
import resource
import statistics
import sys
import time

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optimisers
import parallel
import train
from config import CONVS, DTYPES, OPTIMISERS, Config, check
from model import ConvNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2048, help="global images per step")
    p.add_argument("--devices", type=int, default=0, help="emulated CPU devices (0: leave the backend as is)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--channels", default="32,64,128,256")
    p.add_argument("--dense", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--conv", choices=CONVS, default="auto", help="as train.py's --conv")
    p.add_argument("--optimiser", choices=OPTIMISERS, default="adam")
    p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner-loop", choices=["compiled", "python", "both"], default="python")
    p.add_argument("--microbatch", type=int, default=0, help="per device; 0: as train.py chooses")
    p.add_argument("--compare", action="store_true", help="also time the straightforward reference step")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def timed(fn, repeats):
    """Median seconds of `fn()` over repeats (fn must block until its work is done)."""
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def matmul_peak(dtype, size):
    """Measured FLOP/s of one large square matmul on the first device."""
    a = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    return 2 * size ** 3 / timed(lambda: matmul(a).block_until_ready(), 5)


def flops_per_image(channels, dense, image_size, classes=10):
    """Forward + backward FLOPs of one image, counting 2 per multiply-add.

    Counted from the layer shapes rather than XLA's cost analysis, which on GPU does not see inside the
    cuDNN convolutions (it reported 2 MFLOP there, against 83 MFLOP on CPU). The backward pass costs
    twice the forward (input and weight gradients), except that the first conv needs no input gradient.
    """
    side, inputs, forward, first = image_size, 3, 0, None
    for width in channels:
        side = -(-side // 2)  # stride 2, SAME padding
        layer = 2 * side * side * 9 * inputs * width
        forward, first, inputs = forward + layer, first or layer, width
    forward += 2 * (inputs * dense + dense * classes)
    return 3 * forward - first


def random_batch(per_device, image_size, float_images=False):
    """Random images, labels and an all-ones mask, sharded over the devices like train.py's data.

    Made with NumPy: jax.random would build 32-bit intermediates 4x the size of a whole-dataset batch.
    """
    rng = np.random.default_rng(0)
    shape = (jax.local_device_count(), per_device)
    images = rng.integers(0, 256, (*shape, image_size, image_size, 3), dtype=np.uint8)  # (D, P, S, S, 3)
    labels = rng.integers(0, 10, shape, dtype=np.int32)
    images, labels, mask = parallel.on_devices(images, labels, np.ones(shape, np.float32))
    if float_images:
        images = jax.pmap(lambda x: x.astype(jnp.float32) / 255.0)(images)
    return images, labels, mask


def reference_step(state, images, labels):
    """The original's structure: per-device mean loss and gradient, averaged over the devices (pmean)."""
    def mean_loss(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    return state.apply_gradients(grads=grads), loss


def measure(name, run_steps, state, batch, images_per_step, steps, repeats):
    """Compile (first call), then the median of `repeats` runs of `steps` steps."""
    tick = time.perf_counter()
    state, loss = run_steps(state, *batch)
    float(loss[0])
    compile_seconds = time.perf_counter() - tick

    holder = {"state": state}

    def one_repeat():
        holder["state"], loss = run_steps(holder["state"], *batch)
        float(loss[0])
    seconds = timed(one_repeat, repeats)
    return {"name": name, "images_per_second": images_per_step * steps / seconds,
            "step_seconds": seconds / steps, "first_call_seconds": compile_seconds}


def python_loop(step, steps):
    def run_steps(state, *batch):
        for _ in range(steps):
            state, loss = step(state, *batch)
        return state, loss
    return run_steps


def peak_memory():
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_device_bytes": stats["peak_bytes_in_use"], "memory_source": "device memory_stats"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_device_bytes": rss // jax.local_device_count(), "peak_process_bytes": rss,
            "memory_source": "process max RSS / devices (CPU)"}


def main(argv=None):
    a = parse_args(argv)
    if a.devices:
        jax.config.update("jax_num_cpu_devices", a.devices)  # before the backend starts
    devices = jax.device_count()
    if a.batch % devices:
        sys.exit(f"bench.py: error: --batch {a.batch} does not divide over {devices} devices")
    per_device = a.batch // devices
    config = Config(optimiser=a.optimiser, learning_rate=1e-3, channels=tuple(int(c) for c in a.channels.split(",")),
                    dense=a.dense, dtype=a.dtype, conv=a.conv, microbatch=a.microbatch, image_size=a.image_size,
                    dataset="synthetic")
    check(config)
    channels, conv = config.channels, parallel.choose_conv(config)
    model = ConvNet(channels, a.dense, 10, jnp.dtype(a.dtype), conv)
    optimiser = optimisers.make_optimiser(a.optimiser)
    microbatch = parallel.choose_microbatch(config, per_device, a.image_size)
    kind = jax.devices()[0].device_kind
    peak_size = 4096 if jax.default_backend() == "cpu" else 16384
    peaks = {dtype: matmul_peak(dtype, peak_size) for dtype in ("float32", "bfloat16")}
    flops = flops_per_image(channels, a.dense, a.image_size)
    print(f"jax {jax.__version__} {jax.default_backend()} ({kind}), {devices} devices; batch {a.batch} "
          f"({per_device} per device, microbatch {microbatch}), {a.dtype}, {conv} convs, {a.optimiser}; "
          f"{flops / 1e6:.1f} MFLOP per image; matmul peak f32 {peaks['float32'] / 1e9:,.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16'] / 1e9:,.0f} GFLOP/s (measured, one device)", flush=True)

    state = optimisers.with_hyperparams(optimisers.create_state(model, optimiser, 0, (a.image_size,) * 2 + (3,)),
                                        config)
    state = flax.jax_utils.replicate(state)
    batch = random_batch(per_device, a.image_size)
    step_kwargs = dict(example_count=float(a.batch), microbatch=microbatch)
    rows = []
    modes = ["python", "compiled"] if a.inner_loop == "both" else [a.inner_loop]
    for mode in modes:
        if mode == "python":
            step = jax.pmap(functools.partial(train.train_step, **step_kwargs), axis_name=parallel.AXIS,
                            donate_argnums=0)
            run_steps = python_loop(step, a.steps)
        else:
            run_steps = jax.pmap(functools.partial(train.inner_loop, steps=a.steps, **step_kwargs),
                                 axis_name=parallel.AXIS, donate_argnums=0)
        state_copy = jax.tree.map(jnp.copy, state)
        rows.append(measure(f"project, {mode} loop", run_steps, state_copy, batch, a.batch, a.steps, a.repeats))
        print(f"  {rows[-1]['name']}: {rows[-1]['images_per_second']:,.0f} img/s", flush=True)
    if a.compare:
        del batch
        reference_model = ConvNet(channels, a.dense, 10, jnp.float32)
        reference_state = flax.jax_utils.replicate(optimisers.with_hyperparams(
            optimisers.create_state(reference_model, optimiser, 0, (a.image_size,) * 2 + (3,)), config))
        images, labels, _ = random_batch(per_device, a.image_size, float_images=True)
        step = jax.pmap(reference_step, axis_name=parallel.AXIS, donate_argnums=0)
        rows.append(measure("reference (float32 images, python loop)", python_loop(step, a.steps),
                            reference_state, (images, labels), a.batch, a.steps, a.repeats))
    peak = peaks["bfloat16" if a.dtype == "bfloat16" else "float32"]
    baseline = rows[-1]["images_per_second"] if a.compare else None
    print(f"{'step':42s} {'img/s':>12s} {'step s':>9s} {'1st call s':>10s} {'GFLOP/s':>9s} {'of peak':>8s}"
          + ("  speed-up" if baseline else ""))
    for row in rows:
        row["flops_per_second"] = row["images_per_second"] * flops
        row["share_of_peak"] = row["flops_per_second"] / peak
        print(f"{row['name']:42s} {row['images_per_second']:12,.0f} {row['step_seconds']:9.3f} "
              f"{row['first_call_seconds']:10.1f} {row['flops_per_second'] / 1e9:9,.1f} {row['share_of_peak']:8.1%}"
              + (f"  {row['images_per_second'] / baseline:7.2f}x" if baseline else ""))
    memory = peak_memory()
    print(f"peak memory per device: {memory['peak_device_bytes'] / 2 ** 30:.2f} GiB ({memory['memory_source']})")
    result = {"config": vars(a), "backend": jax.default_backend(), "device_kind": kind, "devices": devices,
              "microbatch": microbatch, "flops_per_image": flops, "matmul_peak_flops": peaks, "rows": rows,
              **memory}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
