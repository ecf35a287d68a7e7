"""Eight emulated CPU devices, set before anything imports jax."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
import xla_setup  # noqa: E402,F401

SHARED_EUROSAT = os.path.join(ROOT, "..", "shared", "eurosat", "EuroSAT_RGB")
