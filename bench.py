"""Benchmark the train step: images/s, step and compile time, achieved FLOP/s against the machine's peak.

    python bench.py --batch 2048 --devices 8 --compare          # CPU, 8 emulated devices
    python bench.py --batch 172800 --dtype bfloat16             # one GPU, the blog's batch

Times the same pmapped step and inner loop train.py runs, on random uint8 images made with NumPy on the
host and placed on the devices. `--compare` also times a reference written the straightforward way
(float32 images, per-device mean gradients averaged over the devices with `pmean`, a Python loop of
pmapped steps; the original psum'd those means, which differs only by the device count as a factor)
so that speed-ups are ratios from one run. Prints a table; `--json PATH` also writes the figures.
"""
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import resource
import statistics
import time

import xla_setup  # noqa: F401  (must come before jax starts its backend)

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optimisers
import parallel
import steps
from config import CONVS, DTYPES, OPTIMISERS, Config, check, check_output, parser
from errors import UsageError, exit_on_failure
from model import ConvNet


def build_parser():
    default = Config()  # train.py's own defaults, so that a bare bench.py times train.py's step
    p = parser("bench.py", __doc__)
    p.add_argument("--batch", type=int, default=2048,
                   help="global images per step (train.py's whole set is 172,800: about 90 s a step on a 2-core CPU)")
    p.add_argument("--devices", type=int, default=0, help="emulated CPU devices (0: leave the backend as is)")
    p.add_argument("--dtype", choices=DTYPES, default=default.dtype)
    p.add_argument("--channels", default=",".join(map(str, default.channels)))
    p.add_argument("--dense", type=int, default=default.dense)
    p.add_argument("--image-size", type=int, default=default.image_size)
    p.add_argument("--conv", choices=CONVS, default=default.conv, help="as train.py's --conv")
    p.add_argument("--optimiser", choices=OPTIMISERS, default=default.optimiser)
    p.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner-loop", choices=["compiled", "python", "both"], default="python")
    p.add_argument("--microbatch", type=int, default=default.microbatch, help="per device; 0: as train.py chooses")
    p.add_argument("--compare", action="store_true", help="also time the straightforward reference step")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                   help="time each of these step variants in this one process, e.g. base conv=space_to_depth "
                        "conv=xla,remat_gelu=1 microbatch=4096 dtype=float32 (fields: conv, remat_gelu, "
                        "microbatch, dtype; the flags above give the rest)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace one more run of each variant with jax.profiler into DIR and put its largest "
                        "kernels (time per step) into the figures")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    for flag in ("--batch", "--steps", "--repeats"):
        if getattr(a, flag[2:]) <= 0:
            raise UsageError(f"{flag} must be positive, got {getattr(a, flag[2:])}")
    if a.devices < 0:
        raise UsageError(f"--devices must be >= 0 (0: the backend's own), got {a.devices}")
    try:
        a.channels = tuple(int(c) for c in a.channels.split(","))
    except ValueError:
        raise UsageError(f"--channels {a.channels!r} is not a comma-separated list of integers") from None
    check_output("--json", a.json)  # before the benchmark: it would fail only once its figures were made
    check_output("--profile", a.profile, folder=True)
    a.variants = {text: parse_variant(text) for text in a.variants or ["base"]}  # checked before any work
    return a


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


# Device lines that summarise what other lines of the same device hold: counting them too would count a
# kernel's time twice or three times.
SUMMARY_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope", "Source code")


def kernel_summary(trace_dir: str, steps: int, top: int = 12) -> dict:
    """Per step, the time each kernel (op, on the CPU) took in a jax.profiler trace, the largest first: what
    limits the step. Read from the trace's perfetto JSON: the device tracks' kernel lines where there are
    any, else the host's ops; each event counted by its self time (less the events nested in it)."""
    path = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
               key=os.path.getmtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e["ph"], e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M"
             and e.get("name") in ("process_name", "thread_name")}
    devices = {pid for (kind, pid, _), name in names.items() if kind == "M" and name.startswith("/device:")}

    def counted(e):
        if e.get("ph") != "X":
            return False
        if devices:
            line = names.get(("M", e["pid"], e.get("tid")), "")
            return e["pid"] in devices and not any(line.startswith(s) for s in SUMMARY_LINES)
        return not e["name"].startswith("$") and "Execut" not in e["name"] and "Pjit" not in e["name"]
    lines = collections.defaultdict(list)
    for e in filter(counted, events):
        lines[e["pid"], e.get("tid")].append(e)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for line in lines.values():  # self time: an event's duration less that of the events it encloses
        line.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        open_events = []
        for e in line:
            while open_events and e["ts"] >= open_events[-1]["ts"] + open_events[-1].get("dur", 0.0):
                open_events.pop()
            if open_events:
                totals[open_events[-1]["name"]][0] -= e.get("dur", 0.0)
            totals[e["name"]][0] += e.get("dur", 0.0)
            totals[e["name"]][1] += 1
            open_events.append(e)
    whole = sum(t for t, _ in totals.values()) / steps
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return {"source": "device kernel lines" if devices else "host ops (CPU)", "microseconds_per_step": whole,
            "lines": sorted({names.get(("M", pid, tid), str(tid)) for pid, tid in lines}),
            "kernels": [{"name": name[:120], "microseconds_per_step": t / steps, "calls_per_step": n / steps,
                         "share": t / steps / whole if whole else 0.0} for name, (t, n) in ranked]}


def measure(name, run_steps, state, batch, images_per_step, steps, repeats, profile_dir=None):
    """Compile (first call), then the median of `repeats` runs of `steps` steps; with `profile_dir`, one
    more run under jax.profiler, summarised per kernel."""
    tick = time.perf_counter()
    state, loss, *_ = run_steps(state, *batch)
    float(loss[0])
    compile_seconds = time.perf_counter() - tick

    holder = {"state": state}

    def one_repeat():
        holder["state"], loss, *_ = run_steps(holder["state"], *batch)
        float(loss[0])
    seconds = timed(one_repeat, repeats)
    row = {"name": name, "images_per_second": images_per_step * steps / seconds,
           "step_seconds": seconds / steps, "first_call_seconds": compile_seconds}
    if profile_dir:
        folder = os.path.join(profile_dir, "".join(c if c.isalnum() else "_" for c in name))
        try:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                one_repeat()
            row["profile"] = kernel_summary(folder, steps)
        except Exception as error:  # a profile that cannot be made must not cost the timing above
            row["profile"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return row


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


def copy_bandwidth(size_bytes):
    """Measured bytes/s (read plus written) of an elementwise pass over a large array on the first device."""
    x = jax.device_put(jnp.ones((size_bytes // 4,), jnp.float32), jax.devices()[0])
    add_one = jax.jit(lambda v: v + 1)
    add_one(x).block_until_ready()
    return 2 * size_bytes / timed(lambda: add_one(x).block_until_ready(), 5)


def bytes_per_image(channels, image_size, dtype_bytes):
    """The fewest bytes one image's step moves when each layer is a kernel of its own, as PERFORMANCE.md
    derives: forward, each conv reads its input and writes its pre-activation z and GELU output h;
    backward, each layer reads the gradient of h, z and its input, and writes the gradient of its input
    (the first conv reads the uint8 images and writes no input gradient). Fusing layers moves fewer."""
    sizes, side = [], image_size
    for width in channels:
        side = -(-side // 2)
        sizes.append(side * side * width)  # values of z (and of h) per image
    images = 3 * image_size ** 2  # uint8
    forward = images + dtype_bytes * (sum(sizes[:-1]) + sizes[-1] + 2 * sum(sizes))  # the pool reads the last h
    backward = images + dtype_bytes * (2 * sum(sizes) + 2 * sum(sizes[:-1]))
    return forward + backward


VARIANT_FIELDS = {"conv": str, "remat_gelu": lambda v: v.lower() in ("1", "true", "yes"), "microbatch": int,
                  "dtype": str}


def parse_variant(text: str) -> dict:
    """'conv=space_to_depth,microbatch=4096' -> the Config fields it overrides ('base': none)."""
    if text == "base":
        return {}
    overrides = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in VARIANT_FIELDS or not value:
            raise UsageError(f"--variants {text!r}: {item!r} is not one of {'/'.join(VARIANT_FIELDS)}=VALUE")
        try:
            overrides[key] = VARIANT_FIELDS[key](value)
        except ValueError:
            raise UsageError(f"--variants {text!r}: {item!r} has no valid value for {key}") from None
    return overrides


def logits_error(model, params, reference_logits, images):
    """||logits - reference|| / ||reference|| on a fixed batch (the reference: nn.Conv in float32)."""
    logits = model.apply({"params": params}, images)
    return float(jnp.linalg.norm(logits - reference_logits) / jnp.linalg.norm(reference_logits))


def time_variant(name, config, a, per_device, batch, check_images, reference_logits):
    """Rows (one per inner-loop mode) for one variant: speed, and its logits' error against nn.Conv."""
    model = ConvNet(config.channels, config.dense, 10, jnp.dtype(config.dtype), parallel.choose_conv(config),
                    remat_gelu=config.remat_gelu)
    optimiser = optimisers.make_optimiser(config.optimiser, lbfgs_memory=config.lbfgs_memory)
    microbatch = parallel.choose_microbatch(config, per_device, a.image_size, group=8)  # as a whole-set step
    state = optimisers.with_hyperparams(optimisers.create_state(model, optimiser, 0, (a.image_size,) * 2 + (3,)),
                                        config)
    error = logits_error(model, state.params, reference_logits, check_images)
    state = parallel.replicate(state)
    step_kwargs = dict(example_count=float(a.batch), population=float(a.batch), microbatch=microbatch,
                       line_search=config.optimiser == "lbfgs")  # L-BFGS's step includes its line search's evaluations
    rows = []
    for mode in ["python", "compiled"] if a.inner_loop == "both" else [a.inner_loop]:
        if mode == "python":  # train.py's own step: with what the optimiser did, the noise scale and a stop flag
            step = jax.pmap(functools.partial(steps.step_agreeing_to_stop, **step_kwargs), axis_name=parallel.AXIS,
                            donate_argnums=0)
            zeros = np.zeros(jax.local_device_count(), np.int32)
            no_sums = np.zeros((jax.local_device_count(), len(steps.SUMS)), np.float32)
            run_steps = python_loop(lambda state, *batch: step(state, *batch, zeros, no_sums, zeros)[:2], a.steps)
        else:
            run_steps = jax.pmap(functools.partial(steps.inner_loop, steps=a.steps, **step_kwargs),
                                 axis_name=parallel.AXIS, donate_argnums=0)
        row = measure(f"{name}, {mode} loop", run_steps, jax.tree.map(jnp.copy, state), batch, a.batch, a.steps,
                      a.repeats, a.profile)
        row.update(variant=name, conv=model.conv, dtype=config.dtype, remat_gelu=config.remat_gelu,
                   microbatch=microbatch, logits_relative_error=error)
        print(f"  {row['name']}: {row['images_per_second']:,.0f} img/s (logits rel. error {error:.1e})", flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    exit_on_failure("bench.py", bench, argv)


def bench(argv=None):
    a = parse_args(argv)
    # 1e-3 for the first-order optimisers (their step's cost does not depend on it); L-BFGS's own 1, since its
    # rate moves its line search's first trial step and with it the evaluations a step makes.
    base = Config(optimiser=a.optimiser, learning_rate=1.0 if a.optimiser == "lbfgs" else 1e-3,
                  channels=a.channels, dense=a.dense, dtype=a.dtype,
                  conv=a.conv, microbatch=a.microbatch, image_size=a.image_size, dataset="synthetic")
    check(base)
    variants = {text if len(a.variants) > 1 or text != "base" else "project": dataclasses.replace(base, **fields)
                for text, fields in a.variants.items()}
    for config in variants.values():
        if config.dtype not in DTYPES or config.conv not in CONVS:
            raise UsageError(f"--variants: dtype {config.dtype!r} or conv {config.conv!r} is not one of "
                             f"{DTYPES} / {CONVS}")
        check(config)
    if a.devices:
        jax.config.update("jax_num_cpu_devices", a.devices)  # before the backend starts
    devices = jax.device_count()
    if a.batch % devices:
        raise UsageError(f"--batch {a.batch} does not divide over the {devices} devices")
    per_device = a.batch // devices
    kind = jax.devices()[0].device_kind
    on_cpu = jax.default_backend() == "cpu"
    # On the CPU a 2048-wide matmul already measures the peak (167-184 GFLOP/s f32 against 125 at 4096, one sitting).
    peaks = {dtype: matmul_peak(dtype, 2048 if on_cpu else 16384) for dtype in ("float32", "bfloat16")}
    bandwidth = copy_bandwidth(2 ** 28 if on_cpu else 2 ** 31)
    flops = flops_per_image(base.channels, a.dense, a.image_size)
    print(f"jax {jax.__version__} {jax.default_backend()} ({kind}), {devices} devices; batch {a.batch} "
          f"({per_device} per device), {a.optimiser}; {flops / 1e6:.1f} MFLOP per image; matmul peak f32 "
          f"{peaks['float32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:,.0f} GFLOP/s; copy "
          f"{bandwidth / 1e9:,.0f} GB/s (measured, one device)", flush=True)

    # The same 64 images through every variant, against nn.Conv in float32 with the same params.
    check_images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, a.image_size, a.image_size, 3)),
                               jnp.uint8)
    reference = ConvNet(base.channels, a.dense, 10, jnp.float32, "xla")
    reference_params = optimisers.create_state(reference, optimisers.make_optimiser(a.optimiser), 0,
                                               (a.image_size,) * 2 + (3,)).params
    reference_logits = reference.apply({"params": reference_params}, check_images)
    batch = random_batch(per_device, a.image_size)
    rows = []
    for name, config in variants.items():
        try:
            rows += time_variant(name, config, a, per_device, batch, check_images, reference_logits)
        except Exception as error:  # one variant that does not compile or fit must not cost the others
            print(f"  {name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            rows.append({"name": name, "variant": name, "error": f"{type(error).__name__}: {str(error)[:1000]}"})
    if a.compare:
        del batch
        reference_state = parallel.replicate(optimisers.with_hyperparams(
            optimisers.create_state(reference, optimisers.make_optimiser(a.optimiser), 0,
                                    (a.image_size,) * 2 + (3,)), base))
        images, labels, _ = random_batch(per_device, a.image_size, float_images=True)
        step = jax.pmap(reference_step, axis_name=parallel.AXIS, donate_argnums=0)
        rows.append(measure("reference (float32 images, python loop)", python_loop(step, a.steps),
                            reference_state, (images, labels), a.batch, a.steps, a.repeats))
        rows[-1].update(dtype="float32")
    baseline = rows[-1]["images_per_second"] if a.compare else None
    print(f"{'step':52s} {'img/s':>12s} {'step s':>9s} {'1st call s':>10s} {'GFLOP/s':>9s} {'of peak':>8s} "
          f"{'of bytes':>8s}" + ("  speed-up" if baseline else ""))
    for row in rows:
        if "error" in row:
            print(f"{row['name']:52s} failed")
            continue
        dtype_bytes = 2 if row["dtype"] == "bfloat16" else 4
        row["flops_per_second"] = row["images_per_second"] * flops
        row["share_of_peak"] = row["flops_per_second"] / peaks[row["dtype"]]
        row["bytes_per_image"] = bytes_per_image(base.channels, a.image_size, dtype_bytes)
        row["share_of_byte_bound"] = row["images_per_second"] * row["bytes_per_image"] / bandwidth
        print(f"{row['name']:52s} {row['images_per_second']:12,.0f} {row['step_seconds']:9.3f} "
              f"{row['first_call_seconds']:10.1f} {row['flops_per_second'] / 1e9:9,.1f} {row['share_of_peak']:8.1%} "
              f"{row['share_of_byte_bound']:8.1%}" + (f"  {row['images_per_second'] / baseline:7.2f}x"
                                                       if baseline else ""))
    memory = peak_memory()
    print(f"peak memory per device: {memory['peak_device_bytes'] / 2 ** 30:.2f} GiB ({memory['memory_source']})")
    result = {"config": {**vars(a), "variants": list(a.variants)}, "backend": jax.default_backend(),
              "device_kind": kind, "devices": devices,
              "microbatch": rows[0].get("microbatch"), "flops_per_image": flops, "matmul_peak_flops": peaks,
              "copy_bandwidth_bytes_per_second": bandwidth, "rows": rows, **memory}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
