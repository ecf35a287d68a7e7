"""A run's settings: the flags, their checks, and the one frozen `Config` every entry point uses.

`parse(argv)` turns train.py's command line into a checked Config; sweep.py varies one with
`dataclasses.replace`; bench.py and the tests build theirs with `Config(...)` and `check`.
"""
import argparse
import dataclasses
import math
import os
import tempfile

from errors import UsageError, fail
from model import CONVS as CONV_FORMULATIONS
from model import DEFAULT_CHANNELS, DEFAULT_DENSE, INITIALISERS

OPTIMISERS = ("lamb", "adam", "sgd", "muon", "lbfgs")
BLOG_OPTIMISERS = OPTIMISERS[:3]  # the blog's comparison; muon and lbfgs came later (RESULTS.md section 11)
# L-BFGS's rate scales the direction its line search searches along: 1 is optax's (the line search's own step).
DEFAULT_LEARNING_RATES = {"lamb": 1e-2, "adam": 1e-3, "sgd": 1e-1, "muon": 2e-2, "lbfgs": 1.0}
# Epsilon is LAMB's and Adam's only (SGD has none). LAMB's is the original's effective one, optax's 1e-6 over
# the 32 devices whose per-device mean gradients it summed: the best at reduced scale (RESULTS.md, section 7).
# Adam keeps optax's 1e-8: the same division (3e-10) was no better there.
DEFAULT_EPSILONS = {"lamb": 1e-6 / 32, "adam": 1e-8, "sgd": None, "muon": None, "lbfgs": None}
OPTAX_EPSILONS = {"lamb": 1e-6, "adam": 1e-8, "sgd": None, "muon": None, "lbfgs": None}
WITH_WEIGHT_DECAY = ("lamb", "adam", "muon")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
DATASETS = ("tfds", "folder", "synthetic")
DTYPES = ("float32", "bfloat16")
CONVS = ("auto", *CONV_FORMULATIONS)
INNER_LOOPS = ("auto", "compiled", "python")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every flag of train.py, with its default. learning_rate and epsilon None mean the optimiser's default."""
    optimiser: str = "lamb"
    learning_rate: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    epsilon: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    ema: float = 0.0
    label_smoothing: float = 0.0
    lamb_exclude_biases: bool = False
    lbfgs_memory: int = 10
    gradient_penalty: float = 0.0
    penalty_block: int = 32
    inner_steps: int = 100
    outer_steps: int = 13
    batch_size: int | None = None
    inner_loop: str = "auto"
    seed: int = 0
    dataset: str = "tfds"
    data_dir: str | None = None
    manual_dir: str | None = None
    synthetic_examples: int = 2000
    image_size: int = 64
    train_examples: int | None = None
    no_augment: bool = False
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    dense: int = DEFAULT_DENSE
    initialiser: str = "flax"
    dtype: str = "float32"
    conv: str = "auto"
    remat_gelu: bool = False
    microbatch: int = 0
    train_eval_examples: int | None = None
    target_accuracy: float = 0.95
    stop_at_target: bool = False
    output_dir: str | None = None
    resume: bool = False
    keep_checkpoints: int = 2
    eval_test: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed_timeout: int = 300

    def __post_init__(self):
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES.get(self.optimiser))
        if self.epsilon is None or DEFAULT_EPSILONS.get(self.optimiser) is None:  # none of its own (parse refuses one)
            object.__setattr__(self, "epsilon", DEFAULT_EPSILONS.get(self.optimiser))
        object.__setattr__(self, "channels", tuple(self.channels))


# What a run computes: a checkpoint resumes only under a config equal in these (checkpoint.run_definition),
# with two refinements there: outer_steps counts only when the schedule's shape depends on the run's
# length, and a data folder counts by its contents, not by its path.
RUN_DEFINITION = ("optimiser", "learning_rate", "weight_decay", "momentum", "epsilon", "schedule", "warmup_steps",
                  "ema", "label_smoothing", "lamb_exclude_biases", "lbfgs_memory", "gradient_penalty", "penalty_block",
                  "inner_steps", "outer_steps", "batch_size", "seed", "dataset", "data_dir", "synthetic_examples",
                  "image_size", "train_examples", "no_augment", "channels", "dense", "initialiser", "dtype")
# The regularisers of a whole-set batch (RESULTS.md section 9): off unless asked for; run names carry them then.
REGULARISERS = {"ema": 0.0, "label_smoothing": 0.0, "lamb_exclude_biases": False, "gradient_penalty": 0.0,
                "penalty_block": 32}


def defaults_before(definition: dict) -> dict:
    """What a run computed in the parts of its definition added after it was written (a definition saved
    without one means this value, so an older checkpoint, sweep or report still reads right): one
    initialiser, the whole set as the batch, optax's epsilons (LAMB's default has changed since), and none
    of the regularisers (and L-BFGS's default memory, which only an L-BFGS run uses)."""
    return {"initialiser": "flax", "batch_size": None, "epsilon": OPTAX_EPSILONS.get(definition.get("optimiser")),
            "lbfgs_memory": 10, **REGULARISERS}


# How it is computed, reported or kept: free to change on resume (other devices, hosts, conv formulation...).
HOW_COMPUTED = ("inner_loop", "manual_dir", "conv", "remat_gelu", "microbatch", "train_eval_examples",
                "target_accuracy", "stop_at_target",
                "output_dir", "resume", "keep_checkpoints", "eval_test", "coordinator_address", "num_processes",
                "process_id", "distributed_timeout")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the module docstring as written and every flag's default."""


def parser(program: str, description: str | None) -> argparse.ArgumentParser:
    """An entry point's parser: --help shows every default, no flag matches by prefix (a prefix of one flag
    must never set another), and a bad flag is one line and exit 2, not a usage dump."""
    p = argparse.ArgumentParser(prog=program, description=description, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.error = lambda message: fail(f"{message} (see {program} --help)")
    return p


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = parser("train.py", description)
    default = Config()
    add = p.add_argument
    add("--optimiser", choices=OPTIMISERS, default=default.optimiser,
        help="optax optimiser: lamb, adam(w), sgd with momentum, muon (optax.contrib: orthogonalised momentum for "
             "the kernels, AdamW for the biases), lbfgs (with its zoom line search; whole-set batch only)")
    add("--learning-rate", type=float, default=None,
        help=f"peak learning rate; default per optimiser {DEFAULT_LEARNING_RATES}; for lbfgs it scales the "
             "direction its line search searches along (1: optax's, the line search's own step)")
    add("--weight-decay", type=float, default=default.weight_decay,
        help="decoupled weight decay (lamb; adam becomes adamw; muon: on the kernels, times the rate)")
    add("--momentum", type=float, default=default.momentum,
        help="sgd momentum (muon keeps optax's 0.95, lamb and adam their optax moments)")
    add("--epsilon", type=float, default=None,
        help=f"lamb's and adam's epsilon (added to the root of the second moment); default per optimiser "
             f"{DEFAULT_EPSILONS}: lamb's is the original's effective one (its psum of per-device mean gradients "
             "on 32 devices made optax's 1e-6 act as 1e-6/32), adam's is optax's (RESULTS.md)")
    add("--schedule", choices=SCHEDULES, default=default.schedule,
        help="learning-rate shape: constant, or linear warmup then cosine or linear decay to 0 at the last step")
    add("--warmup-steps", type=int, default=default.warmup_steps, help="warmup steps of the warmup_* schedules")
    add("--ema", type=float, default=default.ema,
        help="keep an exponential moving average of the parameters with this decay (0: none); each outer loop "
             "evaluates both, and the better on validation is the outer loop's (and the best params')")
    add("--label-smoothing", type=float, default=default.label_smoothing,
        help="cross-entropy against labels smoothed by this much (optax.smooth_labels); accuracy is unchanged")
    add("--lamb-exclude-biases", action="store_true",
        help="lamb: biases take neither weight decay nor the trust ratio, as in LAMB's authors' code (optax's "
             "lamb applies both to every array)")
    add("--lbfgs-memory", type=int, default=default.lbfgs_memory,
        help="lbfgs: curvature pairs kept (optax's default 10)")
    add("--gradient-penalty", type=float, default=default.gradient_penalty,
        help="add this / 2 times the mean over blocks of --penalty-block examples of the squared norm of the "
             "block's mean-loss gradient (double backpropagation; about 3x the step's work; 0: none)")
    add("--penalty-block", type=int, default=default.penalty_block,
        help="examples per block of --gradient-penalty (blocks lie within a device's gradient chunks)")
    add("--inner-steps", type=int, default=default.inner_steps, help="update steps between validation checks")
    add("--outer-steps", type=int, default=default.outer_steps, help="validation checks (outer loops)")
    add("--batch-size", type=int, default=None,
        help="examples per step over all devices, each device drawing its share from its own shard without "
             "replacement within an epoch (order fixed by seed, epoch and device); default: the whole augmented "
             "training set every step, the experiment's batch")
    add("--inner-loop", choices=INNER_LOOPS, default=default.inner_loop,
        help="compiled: the inner steps as one program (fori_loop); python: a host loop of pmapped steps; "
             "auto: python on CPU, compiled elsewhere (measured, see README)")
    add("--seed", type=int, default=default.seed, help="parameter initialisation seed")
    add("--dataset", choices=DATASETS, default=default.dataset,
        help="tfds: eurosat/rgb through tensorflow-datasets; folder: an extracted EuroSAT image folder; "
             "synthetic: generated class-dependent images")
    add("--data-dir", default=None, help="tfds: TFDS data_dir; folder: the folder with one sub-folder per class")
    add("--manual-dir", default=None, help="tfds: folder holding a downloaded EuroSAT.zip (offline use)")
    add("--synthetic-examples", type=int, default=default.synthetic_examples,
        help="synthetic: total examples over all splits")
    add("--image-size", type=int, default=default.image_size, help="synthetic: image side in pixels")
    add("--train-examples", type=int, default=None, help="use the first N examples of the training split")
    add("--no-augment", action="store_true", help="train on the images as they are, without the 8 dihedral forms")
    add("--channels", default=",".join(map(str, default.channels)), help="conv widths, comma separated")
    add("--dense", type=int, default=default.dense, help="hidden dense width")
    add("--initialiser", choices=INITIALISERS, default=default.initialiser,
        help="flax: lecun_normal (truncated normal corrected to std 1/sqrt(fan_in)); haiku: what the original's "
             "haiku drew in 2021 (truncated at 2 std, std 1/sqrt(fan_in) before truncation)")
    add("--dtype", choices=DTYPES, default=default.dtype, help="compute dtype (params stay float32)")
    add("--conv", choices=CONVS, default=default.conv,
        help="how the stride-2 convs are computed, all the same function: xla (nn.Conv), patches (one matmul "
             "over the 9 taps), stem_patches (the first conv as patches, the rest nn.Conv), space_to_depth (a 2x2 "
             "conv on the 2x2-blocked input); auto: patches on CPU, xla elsewhere (measured, see README)")
    add("--remat-gelu", action="store_true",
        help="recompute each GELU in the backward pass instead of keeping its output (less memory traffic)")
    add("--microbatch", type=int, default=default.microbatch,
        help="examples per device per gradient chunk (accumulated inside the step; the chunks are also the noise "
             "scale's small batches); in a whole-set step rounded down to a multiple of 8, whole images with their "
             "8 forms; 0: chosen from device memory")
    add("--train-eval-examples", type=int, default=None,
        help="the training accuracy of each outer loop over the first N/devices training images of every device "
             "(a cheaper check where a forward pass over the whole training split is slow, e.g. on a CPU); "
             "default: all of them")
    add("--target-accuracy", type=float, default=default.target_accuracy,
        help="report when validation accuracy first reaches it")
    add("--stop-at-target", action="store_true", help="stop once --target-accuracy is reached")
    add("--output-dir", default=None,
        help="where process 0 writes metrics.jsonl and best_params.msgpack, and every process a checkpoint "
             "per outer loop (on a pod: a folder every host sees); a checkpoint of the same run there resumes it")
    add("--resume", action="store_true", help="require a checkpoint in --output-dir to continue from")
    add("--keep-checkpoints", type=int, default=default.keep_checkpoints,
        help="latest checkpoints kept, besides the best one")
    add("--eval-test", action="store_true", help="at the end, report test accuracy of the best params")
    add("--coordinator-address", default=None, help="multi-host: host:port of process 0 (not needed on TPU pods)")
    add("--num-processes", type=int, default=None, help="multi-host: number of processes")
    add("--process-id", type=int, default=None, help="multi-host: this process's index")
    add("--distributed-timeout", type=int, default=default.distributed_timeout,
        help="multi-host: seconds to wait for the coordinator at start, and for a silent process mid-run, "
             "before exiting with an error")
    return p


def parse(argv=None, description: str | None = None) -> Config:
    """train.py's command line as a checked Config; a bad value raises UsageError naming the flag."""
    namespace = build_parser(description).parse_args(argv)
    try:
        namespace.channels = tuple(int(c) for c in namespace.channels.split(","))
    except ValueError:
        raise UsageError(f"--channels {namespace.channels!r} is not a comma-separated list of integers") from None
    if namespace.epsilon is not None and DEFAULT_EPSILONS[namespace.optimiser] is None:  # Config would drop it
        raise UsageError(f"--epsilon is LAMB's and Adam's; {namespace.optimiser} has none here: leave it out")
    config = Config(**vars(namespace))
    check(config)
    return config


def check_line_search(c: Config) -> None:
    """L-BFGS's line search evaluates the step's own loss along its direction and chooses the step itself."""
    if c.batch_size:
        raise UsageError("--batch-size: lbfgs takes the whole set as its batch (a line search on a batch drawn "
                         "each step would search a different function at every step): leave it out")
    if c.schedule != "constant":
        raise UsageError(f"--schedule {c.schedule}: lbfgs's line search chooses each step's length (a schedule "
                         "would rescale the step it found): leave it out")
    if c.gradient_penalty:
        raise UsageError("--gradient-penalty: lbfgs's line search evaluates the plain loss: leave it out")


def check(config: Config) -> None:
    """Reject impossible settings before any data is loaded or device touched."""
    c = config
    positive = {"--learning-rate": c.learning_rate, "--inner-steps": c.inner_steps, "--outer-steps": c.outer_steps,
                "--dense": c.dense, "--image-size": c.image_size, "--synthetic-examples": c.synthetic_examples,
                "--keep-checkpoints": c.keep_checkpoints, "--distributed-timeout": c.distributed_timeout}
    for flag, value in (("--train-examples", c.train_examples), ("--train-eval-examples", c.train_eval_examples)):
        if value is not None:
            positive[flag] = value
    for flag, value in positive.items():
        if not value > 0 or not math.isfinite(value):
            raise UsageError(f"{flag} must be positive, got {value}")
    if min(c.channels) <= 0:
        raise UsageError(f"--channels must all be positive, got {c.channels}")
    if c.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {c.weight_decay}")
    if c.epsilon is not None and not (c.epsilon > 0 and math.isfinite(c.epsilon)):
        raise UsageError(f"--epsilon must be positive, got {c.epsilon}")
    if not 0 <= c.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {c.momentum}")
    if not 0 <= c.ema < 1:
        raise UsageError(f"--ema must be in [0, 1) (0: none), got {c.ema}")
    if not 0 <= c.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
    if not 0 <= c.gradient_penalty < math.inf:
        raise UsageError(f"--gradient-penalty must be >= 0 (0: none), got {c.gradient_penalty}")
    if c.penalty_block <= 0:
        raise UsageError(f"--penalty-block must be positive, got {c.penalty_block}")
    if c.lamb_exclude_biases and c.optimiser != "lamb":
        raise UsageError(f"--lamb-exclude-biases is LAMB's; {c.optimiser} has no trust ratio: leave it out")
    if c.penalty_block != Config.penalty_block and not c.gradient_penalty:
        raise UsageError("--penalty-block needs --gradient-penalty: leave it out, or add the penalty")
    # A flag the run would ignore must not be recorded as if it applied.
    if c.optimiser != "sgd" and c.momentum != Config.momentum:
        kept = {"muon": "Muon's momentum is optax's 0.95", "lbfgs": "L-BFGS keeps curvature pairs, not a momentum"}.get(
            c.optimiser, "its moments' decay rates are optax's defaults")
        raise UsageError(f"--momentum is SGD's; {c.optimiser} has none to set ({kept}): leave it out, or use "
                         "--optimiser sgd")
    if c.optimiser not in WITH_WEIGHT_DECAY and c.weight_decay:
        raise UsageError(f"--weight-decay is LAMB's, Adam's and Muon's (decoupled); {c.optimiser} has none here: "
                         "leave it out")
    if c.lbfgs_memory <= 0:
        raise UsageError(f"--lbfgs-memory must be positive, got {c.lbfgs_memory}")
    if c.optimiser != "lbfgs" and c.lbfgs_memory != Config.lbfgs_memory:
        raise UsageError(f"--lbfgs-memory is L-BFGS's; {c.optimiser} keeps no curvature pairs: leave it out")
    if c.optimiser == "lbfgs":
        check_line_search(c)
    if c.schedule == "constant" and c.warmup_steps:
        raise UsageError("--warmup-steps needs a warmup schedule: add --schedule warmup_cosine or warmup_linear, or "
                         "leave it out")
    if not 0 <= c.warmup_steps < c.inner_steps * c.outer_steps:
        raise UsageError(f"--warmup-steps must be in [0, total steps {c.inner_steps * c.outer_steps}), "
                         f"got {c.warmup_steps}")
    if c.batch_size is not None and c.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive (leave it out for the whole set), got {c.batch_size}")
    if c.batch_size and c.batch_size * c.inner_steps * c.outer_steps >= 2 ** 31:  # the draw counts in int32
        raise UsageError(f"--batch-size {c.batch_size} over {c.inner_steps * c.outer_steps} steps draws 2^31 "
                         "examples or more: fewer steps or a smaller batch")
    if c.microbatch < 0:
        raise UsageError(f"--microbatch must be >= 0 (0 = automatic), got {c.microbatch}")
    if not 0 < c.target_accuracy <= 1:
        raise UsageError(f"--target-accuracy must be in (0, 1], got {c.target_accuracy}")
    if c.dataset == "folder" and not c.data_dir:
        raise UsageError("--dataset folder needs --data-dir PATH")
    if c.output_dir and "://" in c.output_dir:
        raise UsageError(f"--output-dir {c.output_dir}: a URL is not a folder train.py can write; give a folder "
                         "every host sees: an NFS or Filestore share, or a bucket mounted with gcsfuse on every host "
                         "(one with hierarchical namespace: orbax's atomic checkpoints rename folders)")
    check_output("--output-dir", c.output_dir, folder=True)
    if c.resume and not c.output_dir:
        raise UsageError("--resume needs --output-dir, the folder holding the checkpoint")
    multihost = (c.coordinator_address, c.num_processes, c.process_id)
    if any(v is not None for v in multihost) and any(v is None for v in multihost):
        raise UsageError("--coordinator-address, --num-processes and --process-id go together")
    if c.num_processes is not None:
        if c.num_processes < 1:
            raise UsageError(f"--num-processes must be >= 1, got {c.num_processes}")
        if not 0 <= c.process_id < c.num_processes:
            raise UsageError(f"--process-id {c.process_id} is outside 0..{c.num_processes - 1}")
        host, _, port = c.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--coordinator-address {c.coordinator_address!r} is not host:port")


def check_output(flag: str, path: str | None, folder: bool = False) -> None:
    """Refuse, with one line naming the flag, an output path that could not be written, before any work is done
    (every entry point checks each of its output flags with this as it parses them): a file that is a folder or
    lies in a missing folder, a folder that is a file. A missing folder is fine (it is made, with any missing
    parents), but the nearest folder that exists must take a new file: a probe is made there and removed at
    once, since permissions alone do not say (root writes anywhere but /proc, or a read-only mount). An existing
    file must open for appending (nothing is written to it)."""
    if not path:
        return
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path} exists and is not a folder")
        where = os.path.abspath(path)
        while not os.path.exists(where):
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            raise UsageError(f"{flag} {path}: {where} is not a folder")
    else:
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a folder; give a file's path")
        where = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(where):
            raise UsageError(f"{flag} {path}: its folder {where} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".writable-"):
            pass
        if not folder and os.path.exists(path):
            open(path, "a").close()
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written: {error.strerror or error}") from None
