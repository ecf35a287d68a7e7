"""What a run shows while it runs, on process 0: one line with the time a step, an outer loop and the whole
run will take, as soon as a step's time is known without its compilation; then, while an outer loop of the
Python inner loop lasts more than a few seconds, a tqdm bar on a terminal or, in a log file, a plain line at
most every 30 s. The compiled inner loop is one program with no host round trip per step, so it shows
nothing between its outer-loop lines."""
import sys
import time

import jax

try:  # tqdm is pinned in requirements.txt; a bare accelerator machine may lack it, then plain lines do
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

LINE_EVERY_SECONDS = 30
SHOW_ABOVE_SECONDS = 5  # an outer loop shorter than this needs no progress display
REDUCED_SCALE = "--train-examples 256 --inner-steps 10 --outer-steps 8"  # RESULTS.md, section 1


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Fed by the loops: `step()` after each completed step of the Python inner loop, `outer_done()` after
    each outer loop. `stream` is where bars and lines go (stderr), `interactive` whether it is a terminal."""

    def __init__(self, config, examples_per_step: int, steps_done: int, stream=None, interactive=None):
        self.config, self.examples_per_step = config, examples_per_step
        self.total = config.inner_steps * config.outer_steps
        self.done, self.speaking = steps_done, jax.process_index() == 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.seconds_per_step, self.estimated = None, False
        self.last_step_at, self.steps_seen, self.bar, self.last_line_at = None, 0, None, 0.0

    def begin_outer(self, outer: int) -> None:
        self.outer, self.in_outer, self.last_step_at = outer, 0, time.perf_counter()

    def step(self) -> None:
        """One step of the Python inner loop has finished (the loop waits for each before the next)."""
        now = time.perf_counter()
        self.done, self.in_outer, self.steps_seen = self.done + 1, self.in_outer + 1, self.steps_seen + 1
        # The loop reports a step once the next is queued, and where dispatch itself waits for the work (the
        # CPU) that is after the next has run: the first and the last report of an outer loop can then be a
        # step late or early. Only the times between the others are a step's, on every backend; the first
        # step of a run also compiles. (Outer loops of 2 steps have none: outer_done() estimates those.)
        if self.steps_seen > 1 and 1 < self.in_outer < self.config.inner_steps:
            taken = now - self.last_step_at
            earlier = self.seconds_per_step
            self.seconds_per_step = taken if earlier is None else 0.8 * earlier + 0.2 * taken  # smoothed
            self.estimate()
        if self.steps_seen > 1:
            self.show(now)
        self.last_step_at = now

    def outer_done(self, inner_seconds: float, outers_seen: int) -> None:
        """An outer loop has finished; without a step's time from step(), the speed is known from the second
        outer loop (the first compiles)."""
        self.close_bar()
        if self.steps_seen == 0:  # the compiled loop reports no steps
            self.done += self.config.inner_steps
        if self.seconds_per_step is None and outers_seen > 1:
            self.seconds_per_step = inner_seconds / self.config.inner_steps
            self.estimate()

    def estimate(self) -> None:
        """Once: the time a step, an outer loop and the whole run take."""
        if self.estimated or not self.speaking:
            return
        self.estimated = True
        step, inner = self.seconds_per_step, self.config.inner_steps
        rate = self.examples_per_step / step
        line = (f"speed: {step:.3g} s per step of {self.examples_per_step:,} images ({rate:,.0f} img/s); an outer "
                f"loop of {inner} steps takes about {human(step * inner)}, the whole run of {self.total:,} steps "
                f"about {human(step * self.total)}")
        if step * self.total > 3600 and jax.default_backend() == "cpu":
            line += f"; on this CPU, a reduced-scale run ({REDUCED_SCALE}) takes minutes"
        print(line, flush=True)

    def show(self, now: float) -> None:
        """The bar, or a plain line at most every LINE_EVERY_SECONDS, while an outer loop lasts long enough."""
        step, inner = self.seconds_per_step, self.config.inner_steps
        if not self.speaking or step is None or step * inner < SHOW_ABOVE_SECONDS:
            return
        run_left = human(step * (self.total - self.done))
        if self.interactive and tqdm is not None:
            if self.bar is None:
                self.bar = tqdm(total=inner, initial=self.in_outer - 1, unit="step", file=self.stream, leave=False,
                                desc=f"outer {self.outer}/{self.config.outer_steps}", dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.examples_per_step / step:,.0f} img/s, run left {run_left}", refresh=False)
        elif now - self.last_line_at >= LINE_EVERY_SECONDS:
            self.last_line_at = now
            print(f"outer {self.outer}/{self.config.outer_steps}: step {self.done:,}/{self.total:,} "
                  f"({self.in_outer} of {inner} in this outer loop), {self.examples_per_step / step:,.0f} img/s, "
                  f"outer loop left {human(step * (inner - self.in_outer))}, run left {run_left}", file=self.stream,
                  flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
