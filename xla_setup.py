"""XLA settings that must be in the environment before JAX starts its backend.

Emulated CPU devices share the host's cores, so one whole-dataset step can keep a device waiting at the
gradient all-reduce for minutes; XLA's CPU runtime aborts the process after 40 s by default. Imported
before jax by every entry point; it leaves alone any value the user already set.
"""
import os

CPU_COLLECTIVE_TIMEOUTS = {
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": 600,
    "--xla_cpu_collective_call_terminate_timeout_seconds": 7200,
}


def add_cpu_collective_timeouts(environ=os.environ) -> None:
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms:
        return
    flags = environ.get("XLA_FLAGS", "")
    missing = [f"{name}={value}" for name, value in CPU_COLLECTIVE_TIMEOUTS.items() if name not in flags]
    if missing:
        environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


add_cpu_collective_timeouts()
