"""Where a run's processes and devices are, and what fits on them: starting the processes of a multi-host
run, the process-0 log, placing host arrays on the devices, and the choices that depend on the backend
and its memory (conv formulation, microbatch size).
"""
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from errors import PeerError

AXIS = "devices"  # the pmap axis: every device of every host


def log(message: str) -> None:
    """Process 0 speaks for the run; the others stay quiet."""
    if jax.process_index() == 0:
        print(message, flush=True)


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


def tpu_cluster() -> str | None:
    """The name of the TPU cluster jax detects itself (jax.distributed.initialize() without arguments then
    joins it), or None: a Cloud TPU VM describes itself through its metadata server ("gcetpu", single host
    or pod slice), a GKE TPU node through its environment ("gketpu"). Both need the machine to be a TPU VM
    (jax checks for TPU chips at import), so elsewhere this asks nothing of the network. jax has no public
    call for it: these are its own cluster classes (jax/_src/clusters, pinned jax), in jax's own order."""
    try:
        from jax._src.clusters import cloud_tpu_cluster
    except ImportError:  # pragma: no cover (another jax): no detection, as before
        return None
    for cluster in (cloud_tpu_cluster.GceTpuCluster, cloud_tpu_cluster.GkeTpuCluster):
        if cluster.is_env_present():
            return cluster.name
    return None


def joined_within(timeout: float, what: str, initialize) -> None:
    """initialize(), or one line and exit 4 once `timeout` seconds pass: jax waits for every process to
    join for its own timeout (we give it more) and then aborts the process with a stack trace (134), which
    no Python code can catch; a peer that never starts must end the others with what to do."""
    from errors import program
    joined = threading.Event()

    def watch():
        if not joined.wait(timeout):
            print(f"{program()}: error: {what} did not all join within --distributed-timeout {timeout:g}s: start "
                  "the same command on every host (and check the process count and the coordinator's address)",
                  file=sys.stderr, flush=True)
            os._exit(4)
    threading.Thread(target=watch, daemon=True, name="join-timeout").start()
    try:
        initialize()
    finally:
        joined.set()


def init_distributed(config) -> None:
    """Joins the other processes (once per process): the ones --coordinator-address names, or those of the
    TPU cluster jax detects. An unreachable coordinator, processes that never join, or a process that stops
    answering end every process with an error after --distributed-timeout seconds, never a silent hang."""
    global _distributed_started
    if _distributed_started:
        return
    # jax gets a little longer than we wait ourselves: our one line (exit 4) comes before its abort.
    timeouts = dict(initialization_timeout=config.distributed_timeout + 30,
                    heartbeat_timeout_seconds=config.distributed_timeout)
    if config.coordinator_address:
        if config.process_id != 0:  # process 0 runs the coordinator; the others first check they can reach it
            wait_for_coordinator(config.coordinator_address, config.distributed_timeout)
        print(f"process {config.process_id}: joining {config.num_processes} processes at "
              f"{config.coordinator_address} (up to {config.distributed_timeout}s)", flush=True)
        # On CPU clusters the collectives need gloo; the setting is ignored by other backends.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        joined_within(config.distributed_timeout, f"the {config.num_processes} processes",
                      lambda: jax.distributed.initialize(config.coordinator_address, config.num_processes,
                                                         config.process_id, **timeouts))
    elif cluster := tpu_cluster():  # a Cloud TPU VM or pod slice, or GKE: jax reads the rest itself
        print(f"joining the TPU cluster jax detects ({cluster}; up to {config.distributed_timeout}s)", flush=True)
        joined_within(config.distributed_timeout, "the TPU cluster's processes",
                      lambda: jax.distributed.initialize(cluster_detection_method=cluster, **timeouts))
    _distributed_started = True


def gather_counts(count: int) -> np.ndarray:
    """Every process's local example count, in process order."""
    if jax.process_count() == 1:
        return np.array([count])
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.int64(count))).reshape(-1)


def in_split_order(per_device, local_count: int) -> np.ndarray:
    """A per-example value held on the devices (local devices, per_device) as one host vector over the
    whole split in its order: each process holds a contiguous slice, its real examples first (padding
    comes last), and the processes' slices follow each other."""
    local = np.asarray(jax.device_get(per_device)).reshape(-1)[:local_count]  # (local_count,)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    counts = gather_counts(local_count)
    padded = np.zeros(int(counts.max()), local.dtype)
    padded[:local_count] = local
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), -1)  # (processes, max)
    return np.concatenate([row[:count] for row, count in zip(everyone, counts)])


def replicate(tree):
    """`tree` on every local device, laid out as a pmapped function lays out what it returns: flax's
    replicate lays it out otherwise, and a pmapped function then compiled a second time when its output
    came back in (a whole recompile at outer loop 2, found in review)."""
    import flax
    return jax.pmap(lambda t: t, axis_name=AXIS)(flax.jax_utils.replicate(tree))


def on_devices(*arrays):
    """Shard the leading (device) axis of host arrays over this host's devices, as pmap expects."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    sharding = jax.NamedSharding(mesh, jax.P(AXIS))
    return tuple(jax.device_put(a, sharding) for a in arrays)


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


def choose_conv(config) -> str:
    """--conv, or by backend: patch matmuls on the CPU (1.7x nn.Conv there), nn.Conv elsewhere (faster on GPU)."""
    if config.conv != "auto":
        return config.conv
    return "patches" if jax.default_backend() == "cpu" else "xla"


def choose_microbatch(config, per_device: int, image_size: int, group: int = 1) -> int:
    """--microbatch; on the CPU with patch convs a cache-sized chunk; else the largest chunk whose
    activations take a quarter of a device's memory. Rounded down to a multiple of `group` (at least one
    group): a whole-set step passes 8, so that a chunk holds whole images with all their dihedral forms."""
    if config.microbatch:
        chosen = min(config.microbatch, per_device)
    elif jax.default_backend() == "cpu" and choose_conv(config) == "patches":
        chosen = min(CPU_MICROBATCH, per_device)
    else:
        dtype_bytes = 2 if config.dtype == "bfloat16" else 4
        fits = device_memory_bytes() // 4 // activation_bytes_per_example(image_size, config.channels, dtype_bytes)
        chosen = max(1, min(per_device, fits))
    return max(group, chosen // group * group) if chosen < per_device else chosen
