"""What a run reports: process 0's metrics.jsonl (one JSON line per measurement) and its console lines."""
import base64
import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

# Drawing curves.png takes about 0.5 s of the host (1 s the first time, matplotlib's import): on an
# accelerator that is a third of an outer loop of the experiment's size, so during a run it is redrawn at most
# this often, and always once more when the run ends, stops or diverges.
CURVES_EVERY_SECONDS = 60


class MetricsLog:
    """Process 0's metrics.jsonl: a header line, then a line per outer loop, flushed at once so nothing
    measured is lost. On resume the file is cut back to the checkpoint's outer loop (later lines are redone).
    With path None (another process, no --output-dir, or a finished run) it writes nothing. `mirror`, when
    given, also receives every line written (a study's pack)."""

    def __init__(self, path: str | None, header: dict, resumed_after: int | None, mirror: Callable | None = None):
        self.file, self.mirror, self.records, self.config = None, mirror, [], header["config"]
        if path is None:
            return
        self.curves = os.path.join(os.path.dirname(path), "curves.png")
        self.curves_drawn, self.curves_at = 0, time.monotonic()  # records drawn; when
        lines = [json.dumps(header)]
        if resumed_after is not None and os.path.exists(path):
            with open(path) as f:
                earlier = [json.loads(line) for line in f if line.strip()]
            lines = [json.dumps(r) for r in earlier if r.get("outer", 0) <= resumed_after and "summary" not in r]
            self.records = [r for r in earlier if "validation_accuracy" in r and r["outer"] <= resumed_after]
            # The resumed run's own config (e.g. more outer loops): readers take the last config line.
            lines.append(json.dumps({"resumed_after_outer": resumed_after, "config": header["config"],
                                     "devices": jax.device_count(), "processes": jax.process_count(),
                                     "time": time.time()}))
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)
        self.file = open(path, "a")
        self.events = Events(os.path.dirname(path), header, resumed_after)
        for line in lines if self.mirror else []:  # all of it: a pack's run stands alone, header first
            self.mirror(json.loads(line))

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.mirror:
                self.mirror(record)
            if "validation_accuracy" in record:
                self.events.record(record)
                self.records.append(record)
                if time.monotonic() - self.curves_at >= CURVES_EVERY_SECONDS:
                    self.draw_curves()

    def draw_curves(self) -> None:
        """curves.png with every record so far, if any is not drawn yet (and this process writes)."""
        if self.file and len(self.records) > self.curves_drawn:
            write_curves(self.curves, self.records, self.config)
            self.curves_drawn, self.curves_at = len(self.records), time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exception_type, *_):
        if self.file:
            self.file.close()
            self.events.close()
            try:
                self.draw_curves()
            except Exception as error:  # a picture must not hide why the run ended (a stop, a divergence)
                if exception_type is None:
                    raise
                print(f"curves.png not drawn: {type(error).__name__}: {error}", file=sys.stderr)


# Where each scalar of a record goes in TensorBoard (a section per prefix); a scalar not named here (one a later
# change adds) goes under other/, so every scalar of a record is there.
TAGS = {"loss": "loss/train", "train_accuracy": "accuracy/train", "validation_accuracy": "accuracy/validation",
        "best_validation_accuracy": "accuracy/best_validation", "raw_validation_accuracy": "accuracy/validation_raw",
        "ema_validation_accuracy": "accuracy/validation_ema", "learning_rate": "optimiser/learning_rate",
        "gradient_norm": "optimiser/gradient_norm", "update_norm": "optimiser/update_norm",
        "parameter_norm": "optimiser/parameter_norm", "b_simple": "noise/b_simple_images",
        "set_over_b_simple": "noise/set_over_b_simple", "noise_trace": "noise/trace_sigma",
        "gradient_square": "noise/gradient_square", "images_per_second": "speed/images_per_second",
        "inner_seconds": "speed/inner_seconds", "train_seconds": "speed/train_seconds",
        "elapsed_seconds": "speed/elapsed_seconds", "examples_seen": "speed/examples_seen"}
NOT_SCALARS = ("outer", "step")  # the x axis
# Charts that overlay several series: every array's update ratio in one, train and validation accuracy in one.
LAYOUT = {"overlaid": {"update / parameter norm, every array": ["Multiline", [r"update_ratio/.*"]],
                       "accuracy": ["Multiline", [r"accuracy/(train|validation)$"]]}}


class Events:
    """A run's TensorBoard event files (tensorboardX: no TensorFlow in the training process), in its own folder,
    so one `tensorboard --logdir` over a sweep's folder compares its runs. A resumed run starts a new file
    that purges the steps after its checkpoint (TensorBoard's reader hides them), so every step is there
    once. Absent tensorboardX (a bare accelerator machine), nothing is written. The file is opened with the
    first record, not before training (tensorboardX's import takes half a second)."""

    def __init__(self, folder: str, header: dict, resumed_after: int | None):
        self.folder, self.header, self.resumed_after, self.writer = folder, header, resumed_after, None

    def open(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover
            return None
        after, inner = self.resumed_after, self.header["config"]["inner_steps"]
        writer = SummaryWriter(self.folder, purge_step=None if after is None else after * inner + 1, flush_secs=30)
        if after is None:
            writer.add_custom_scalars(LAYOUT)
            writer.add_text("run", run_text(self.header), 0)
        return writer

    def record(self, record: dict) -> None:
        if "step" not in record:
            return
        self.writer = self.writer or self.open()
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(TAGS.get(key, f"other/{key}"), value, record["step"])
        for array, ratio in (record.get("update_ratios") or {}).items():
            if ratio is not None:
                self.writer.add_scalar(f"update_ratio/{array}", ratio, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def event_files(folder: str) -> list[str]:
    """The names of the files in `folder` that TensorBoard's reader takes for its event files: every one whose
    name holds "tfevents", whatever else it is called (a renamed one is still read)."""
    return sorted(name for name in os.listdir(folder) if "tfevents" in name
                  and os.path.isfile(os.path.join(folder, name)))


def run_text(header: dict) -> str:
    """The run's definition as a Markdown table for TensorBoard's text tab: its config, where it ran."""
    rows = [f"| {key} | {value} |" for key, value in sorted(header["config"].items())]
    rows += [f"| {key} | {header[key]} |" for key in ("devices", "processes", "backend", "device_kind", "jax",
                                                     "git_commit", "examples_per_step") if key in header]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def write_events(folder: str, lines: list[dict]) -> None:
    """Event files for a run already measured (its metrics.jsonl's lines): what report.py --events writes."""
    events = Events(folder, lines[0], None)
    for line in lines[1:]:
        events.record(line)
    events.close()


class Pack:
    """Every line of every run's metrics.jsonl also in one file, as {"study_run": name, ...line}, flushed at once:
    what a study on a lent accelerator sends back, complete up to the last outer loop if it is cut off."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def writer(self, name: str) -> Callable:
        def write(line: dict) -> None:
            self.file.write(json.dumps({"study_run": name, **line}) + "\n")
            self.file.flush()
        return write

    def add_file(self, name: str, path: str) -> None:
        """A run's whole metrics.jsonl (a run that ended earlier, or crashed): its header starts the run anew."""
        if os.path.exists(path):
            write = self.writer(name)
            with open(path) as f:
                for line in f:
                    if line.strip():
                        write(json.loads(line))


def read_pack(path: str) -> dict[str, list[dict]]:
    """A pack's runs, each as the lines its own metrics.jsonl holds: a resume line cuts the run's lines back
    to its outer loop, as MetricsLog does; a new header starts the run afresh."""
    runs = {}
    with open(path) as f:
        for line in (json.loads(text) for text in f if text.strip()):
            name = line.pop("study_run", None)
            if name is None:
                continue  # the study's own lines
            if "resumed_after_outer" in line:
                runs[name] = [r for r in runs.get(name, []) if r.get("outer", 0) <= line["resumed_after_outer"]
                              and "summary" not in r] + [line]
            elif "config" in line:
                runs[name] = [line]
            else:
                runs.setdefault(name, []).append(line)
    return runs


def write_curves(path: str, records: list[dict], config: dict) -> None:
    """curves.png of a run: loss; train and validation accuracy; the learning rate in force; the gradient
    noise scale B_simple (noise_scale.py). Written
    atomically; skipped where matplotlib is missing (a bare accelerator machine)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    steps = [r["step"] for r in records]
    figure, (loss, accuracy, rate, noise) = plt.subplots(1, 4, figsize=(17, 3.6))
    loss.plot(steps, [r["loss"] for r in records], marker=".")
    loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    accuracy.plot(steps, [r["train_accuracy"] for r in records], marker=".", label="train")
    accuracy.plot(steps, [r["validation_accuracy"] for r in records], marker=".", label="validation")
    accuracy.set(xlabel="step", ylabel="accuracy", title="accuracy")
    accuracy.legend()
    rate.plot(steps, [r.get("learning_rate", float("nan")) for r in records], marker=".")
    rate.set(xlabel="step", ylabel="learning rate", title="rate in force (last step of each outer loop)")
    measured = [(r["step"], r["b_simple"]) for r in records if r.get("b_simple")]
    noise.plot([m[0] for m in measured], [m[1] for m in measured], marker=".")
    noise.set(xlabel="step", ylabel="B_simple (training images)", yscale="log" if measured else "linear",
              title="gradient noise scale (mean over each outer loop)")
    for axes in (loss, accuracy, rate, noise):
        axes.grid(alpha=0.3)
    figure.suptitle(f"{config['optimiser']} lr {config['learning_rate']:g} ({config['schedule']})")
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=80)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def provenance() -> dict:
    """What made a run: the device, the library versions and the project's git commit (if it is a checkout)."""
    import subprocess

    import flax
    import optax
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    try:  # the project's own checkout only, not one it happens to sit in
        own = os.path.realpath(git("rev-parse", "--show-toplevel") or "/nowhere") == os.path.realpath(here)
        commit = git("rev-parse", "HEAD") or None if own else None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "git_commit": commit, "git_dirty": dirty}


def header_classes(header: dict) -> int:
    """The classes of a run's data, from its metrics header; 10 for a header from before it said (every run
    measured then was of EuroSAT or the synthetic source, both of 10 classes)."""
    return header.get("classes", 10)


def complete_summary(path: str, summary: dict) -> None:
    """Ends metrics.jsonl with `summary` when its last line is no summary, or one without a key `summary`
    has (e.g. the test accuracy); a complete file is left exactly as it is."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    last = json.loads(lines[-1]) if lines else {}
    if "summary" in last and set(summary) <= set(last["summary"]):
        return
    lines = lines[:-1] if "summary" in last else lines
    with open(path + ".tmp", "w") as f:
        f.write("\n".join([*lines, json.dumps({"summary": summary})]) + "\n")
    os.replace(path + ".tmp", path)


def pack_bits(bits) -> str:
    """A 0/1 vector as base64 of its packed bits (2,700 validation images: 452 characters)."""
    return base64.b64encode(np.packbits(np.asarray(bits, bool)).tobytes()).decode()


def unpack_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:count].astype(bool)


def model_line(config, params: int, conv: str, inner_mode: str, microbatch: int, per_device: int) -> str:
    """What a run computes and how, on the console before its first step."""
    optimiser = f"{config.optimiser} lr {config.learning_rate:g}" + (
        f" eps {config.epsilon:g}" if config.epsilon else "") + (
        f" memory {config.lbfgs_memory}" if config.optimiser == "lbfgs" else "")
    return (f"model: {params:,} params ({config.initialiser} init), {config.dtype}; {optimiser} ({config.schedule}); "
            f"{conv} convs{', GELUs recomputed' if config.remat_gelu else ''}; inner loop {inner_mode}; "
            f"microbatch {microbatch} of {per_device} per device")


def noise_text(record: dict) -> str:
    """The noise scale, short: B_simple in training images, and how many such batches the whole set holds."""
    b, ratio = record.get("b_simple"), record.get("set_over_b_simple")
    if b is None:
        return ""
    return (f"B_simple {f'{b:,.0f}' if b >= 10 else f'{b:.2g}'} img" + (f" (set/B {ratio:,.1f})" if ratio else "")
            + " | ")


def outer_line(outer_steps: int, record: dict, best: dict, first: bool) -> str:
    """One outer loop on the console, with what the optimiser did in its last update: the rate in force,
    the gradient's norm, and the smallest, median and largest ratio of an array's update to its norm."""
    ratios = sorted(v for v in record["update_ratios"].values() if v is not None)
    spread = f"{ratios[0]:.1e}/{ratios[len(ratios) // 2]:.1e}/{ratios[-1]:.1e}" if ratios else "-"
    return (f"outer {record['outer']}/{outer_steps} step {record['step']}: loss {record['loss']:.4f} "
            f"train acc {record['train_accuracy']:.4f} val acc {record['validation_accuracy']:.4f} "
            + (f"(raw {record['raw_validation_accuracy']:.4f}, ema {record['ema_validation_accuracy']:.4f}) "
               if "ema_validation_accuracy" in record else "") +
            f"(best {best['validation_accuracy']:.4f} @ outer {best['outer']}) | lr {record['learning_rate']:.3g} "
            f"grad {record['gradient_norm']:.3g} update/param {spread} | "
            + (f"{record['evaluations']:,} evaluations ({record['line_search_failures']} line searches short of a "
               "decrease) | " if "evaluations" in record else "") + f"{record['inner_seconds']:.2f}s "
            f"{record['images_per_second']:,.0f} img/s | " + noise_text(record)
            + f"elapsed {record['elapsed_seconds']:.1f}s"
            + (" (includes compilation)" if first else ""))
