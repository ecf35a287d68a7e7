"""Eight emulated CPU devices, set before anything imports jax."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"  # jax's own setting: it wins over any device count in XLA_FLAGS
import xla_setup  # noqa: E402,F401

SHARED_EUROSAT = os.path.join(ROOT, "..", "shared", "eurosat", "EuroSAT_RGB")
