import json
import os
import subprocess
import sys

from conftest import ROOT

SMALL = ["--dataset", "synthetic", "--image-size", "16", "--channels", "8,16", "--dense", "16"]


def run_train(args, devices=8, extra_env=None, timeout=300, check=True):
    """train.py in a fresh process with `devices` emulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **(extra_env or {}))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return lines[0], [r for r in lines[1:] if "outer" in r], lines[-1].get("summary")
