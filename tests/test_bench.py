import json
import subprocess
import sys

import pytest

import bench
from conftest import ROOT
from helpers import device_env


def test_bench_times_variants_in_both_loops_and_the_reference_checks_each_against_nn_conv_and_profiles_it(
        tmp_path):
    out = tmp_path / "bench.json"
    # --devices 8 in a process started with 1: the flag sets the count, and 8 devices are the test session's, so
    # the compiled programs both share (the persistent cache keys them by device count) are not compiled again.
    subprocess.run([sys.executable, "bench.py", "--batch", "128", "--devices", "8", "--channels", "4,8", "--dense",
                    "8", "--image-size", "16", "--steps", "1", "--repeats", "1", "--inner-loop", "both", "--compare",
                    "--variants", "base", "conv=space_to_depth,remat_gelu=1,dtype=bfloat16", "--json", str(out),
                    "--profile", str(tmp_path / "profile")],
                   cwd=ROOT, env=device_env(1), check=True, capture_output=True, timeout=300)
    figures = json.loads(out.read_text())
    assert figures["devices"] == 8 and figures["microbatch"] == 16
    variants = ["base", "conv=space_to_depth,remat_gelu=1,dtype=bfloat16"]
    assert [r["name"] for r in figures["rows"]] == [f"{v}, {mode} loop" for v in variants
                                                    for mode in ("python", "compiled")] + [
        "reference (float32 images, python loop)"]
    assert all(r["images_per_second"] > 0 and 0 < r["share_of_peak"] for r in figures["rows"])
    # 2 FLOPs per multiply-add, 3x the forward pass less the first conv's input gradient
    first, second, dense = 2 * 8 * 8 * 9 * 3 * 4, 2 * 4 * 4 * 9 * 4 * 8, 2 * (8 * 8 + 8 * 10)
    assert figures["flops_per_image"] == 3 * (first + second + dense) - first
    base, half = figures["rows"][1:4:2]  # the compiled loops
    assert base["conv"] == "patches" and half["conv"] == "space_to_depth" and half["remat_gelu"] is True
    assert base["logits_relative_error"] < 1e-6  # the same function as nn.Conv's (each conv: test_model.py)
    assert 1e-4 < half["logits_relative_error"] < 3e-2  # bf16's rounding, no more
    assert figures["copy_bandwidth_bytes_per_second"] > 0 and all(0 < r["share_of_byte_bound"] for r in figures["rows"])
    # Per image, forward: the uint8 images, each conv's input, z and h written, the pool's read of the last h;
    # backward: the images, the gradient of h and z read, each conv's input read and its gradient written.
    forward, backward = 768 + 4 * (256 + 128 + 2 * 384), 768 + 4 * (2 * 384 + 2 * 256)
    assert base["bytes_per_image"] == forward + backward and half["bytes_per_image"] == 768 * 2 + 2 * (
        256 + 128 + 2 * 384 + 2 * 384 + 2 * 256)
    for row in figures["rows"][:-1]:  # a kernel profile of each: what takes the step's time
        kernels = row["profile"]["kernels"]
        assert kernels and all(0 < k["share"] <= 1 for k in kernels) and row["profile"]["microseconds_per_step"] > 0


def test_the_kernel_summary_counts_each_kernel_once_by_its_self_time(tmp_path):
    """Device kernels are counted on their own lines, not again on the lines that summarise them, and an
    event is counted without the events nested in it."""
    import gzip
    import bench
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "XLA Ops"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #13(Compute)"}},
              {"ph": "X", "name": "fusion.1", "pid": 1, "tid": 1, "ts": 0, "dur": 100},  # a summary line
              {"ph": "X", "name": "conv_kernel", "pid": 1, "tid": 2, "ts": 0, "dur": 60},
              {"ph": "X", "name": "gelu_kernel", "pid": 1, "tid": 2, "ts": 60, "dur": 40},
              {"ph": "X", "name": "conv_kernel", "pid": 1, "tid": 2, "ts": 200, "dur": 60},
              {"ph": "X", "name": "wrapper", "pid": 2, "tid": 9, "ts": 0, "dur": 500}]  # a host event
    folder = tmp_path / "trace" / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = bench.kernel_summary(str(tmp_path / "trace"), steps=2)
    assert summary["microseconds_per_step"] == 80 and summary["lines"] == ["Stream #13(Compute)"]
    assert [(k["name"], k["microseconds_per_step"], k["share"]) for k in summary["kernels"]] == [
        ("conv_kernel", 60, 0.75), ("gelu_kernel", 20, 0.25)]
    nested = [{"ph": "X", "name": "outer", "pid": 3, "tid": 1, "ts": 0, "dur": 100},
              {"ph": "X", "name": "inner", "pid": 3, "tid": 1, "ts": 10, "dur": 70}]
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": nested}, f)
    summary = bench.kernel_summary(str(tmp_path / "trace"), steps=1)  # a CPU trace: host ops, self time
    assert {k["name"]: k["microseconds_per_step"] for k in summary["kernels"]} == {"inner": 70, "outer": 30}


@pytest.mark.parametrize("argv,message", [
    (["--dense", "0"], "--dense must be positive, got 0"),
    (["--channels", "32,,64"], "--channels '32,,64' is not a comma-separated list of integers"),
    (["--variants", "microbatch=abc"], "--variants 'microbatch=abc': 'microbatch=abc' has no valid value for "
                                       "microbatch"),
    (["--variants", "speed=fast"], "--variants 'speed=fast': 'speed=fast' is not one of "
                                   "conv/remat_gelu/microbatch/dtype"),
    (["--variants", "conv=fft"], "--variants: dtype 'float32' or conv 'fft' is not one of"),
    (["--batch", "3"], "--batch 3 does not divide over the 8 devices"),
    (["--batch", "0"], "--batch must be positive, got 0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x' (see bench.py --help)"),
])
def test_bad_bench_inputs_end_with_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("bench.py: error: " + message), err
