import json
import subprocess
import sys

from conftest import ROOT
from helpers import device_env


def test_bench_times_the_step_and_the_reference_and_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    env = device_env()  # bench.py --devices sets its own count
    subprocess.run([sys.executable, "bench.py", "--batch", "32", "--devices", "2", "--channels", "4,8", "--dense", "8",
                    "--image-size", "16", "--steps", "1", "--repeats", "1", "--inner-loop", "both", "--compare",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    figures = json.loads(out.read_text())
    assert figures["devices"] == 2 and figures["microbatch"] == 16
    assert [r["name"] for r in figures["rows"]] == [
        "project, python loop", "project, compiled loop", "reference (float32 images, python loop)"]
    assert all(r["images_per_second"] > 0 and 0 < r["share_of_peak"] for r in figures["rows"])
    # 2 FLOPs per multiply-add, 3x the forward pass less the first conv's input gradient
    first, second, dense = 2 * 8 * 8 * 9 * 3 * 4, 2 * 4 * 4 * 9 * 4 * 8, 2 * (8 * 8 + 8 * 10)
    assert figures["flops_per_image"] == 3 * (first + second + dense) - first
