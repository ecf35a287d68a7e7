"""The failures the project knows, and the one line and exit code each ends a process with.

The lowest module: every other one may raise these, and the entry points hand their work to
`exit_on_failure`, so a known failure never reaches the user as a traceback.
"""
import atexit
import math
import os
import signal
import sys
from typing import Callable


class UsageError(Exception):
    """A flag value that cannot work; its message names the flag."""


class DataError(Exception):
    """A problem with the data that the user has to fix; its message says which."""


class Diverged(Exception):
    """The loss or the logits became NaN or infinite, or the loss blew up (`diverged_loss`); the best params so
    far are kept."""


# A loss this many times the chance loss, ln(classes) (what predicting every class alike scores), has blown up:
# the net is confidently wrong about nearly every example. Under results/ the highest loss of a run that went on
# learning is 1.7 times chance (a spike Adam recovered from); the SGD runs past 5 times went NaN at their next
# check, and LAMB 3e-2 at batch 128 reached 1e12 times after 5 outer loops at chance.
BLOWN_UP_TIMES_CHANCE = 10


def diverged_loss(loss, classes: int) -> bool:
    """Whether an outer loop's loss says the run diverged: NaN or infinite, or above BLOWN_UP_TIMES_CHANCE times
    the chance loss ln(classes). One check is enough, as for a NaN. train.py stops on it, sweep.py and report.py
    judge runs recorded before the rule by it. A diverged record holds a non-finite loss as text ("nan")."""
    loss = float(loss)
    return not math.isfinite(loss) or loss > BLOWN_UP_TIMES_CHANCE * math.log(classes)


class PeerError(Exception):
    """Another process of a multi-host run cannot be reached."""


class Interrupted(Exception):
    """A stop signal ended the work; what is on disk resumes it (the message says what)."""

    def __init__(self, signum: int, message: str):
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"
        super().__init__(f"stopped by {signal.Signals(signum).name} {message}")

    @classmethod
    def during_run(cls, signum: int, outer: int, checkpointed: int, output_dir: str | None, steps_done=None,
                   inner_steps=None) -> "Interrupted":
        """Stopped before outer loop `outer`, or within it after `steps_done` of its steps (then dropped)."""
        if output_dir and checkpointed:
            where = f"the checkpoint after outer loop {checkpointed} in {output_dir} resumes it (run the same command)"
        else:
            where = "no checkpoint to resume from" + ("" if output_dir else " (no --output-dir)")
        within = f" after {steps_done} of its {inner_steps} steps" if steps_done is not None else ""
        return cls(signum, f"during outer loop {outer}{within}; {where}")


PROGRAM = ["train.py"]  # the entry point running, named in every error line (set by exit_on_failure)


def program() -> str:
    return PROGRAM[0]


def fail(message: str, program_name: str | None = None):
    print(f"{program_name or program()}: error: {message}", file=sys.stderr)
    sys.exit(2)


def exit_on_failure(program_name: str, fn: Callable, *fn_args):
    """fn(*fn_args); a failure the project knows ends the process with one line and its exit code:
    2 bad flag or data, 3 diverged, 4 unreachable coordinator or peers, 128 + signal when stopped by one."""
    PROGRAM[0] = program_name
    try:
        return fn(*fn_args)
    except (UsageError, DataError) as error:
        fail(str(error), program_name)
    except Diverged as error:
        print(f"{program_name}: diverged: {error}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as error:
        print(f"{program_name}: {error}", file=sys.stderr)
        leave_after_a_stop(error.exit_code)
    except PeerError as error:
        print(f"{program_name}: error: {error}", file=sys.stderr)
        sys.exit(4)


def leave_after_a_stop(code: int):
    """Ends a stopped process (its work is saved) with `code`: the exit functions run as usual (jax's own
    shutdown among them, while the stop-signal watcher still acts on a second Ctrl-C), then the process
    ends without Python's teardown of its modules. That teardown first puts back the default signal handlers,
    so in its last second or so a Ctrl-C, or a pod's late SIGTERM, would turn the exit into a kill (-2, -15);
    nothing in it is needed once the work is on disk."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
