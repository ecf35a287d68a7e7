"""What a run shows while it runs: the estimate line, the plain progress lines in a log, the bar on a terminal."""
import io

import pytest

import config
import errors
import metrics
import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(display, clock, count, first=30.0, each=0.2):
    for number in range(count):
        clock.now += first if number == 0 else each
        display.step()


def test_after_the_second_step_one_line_gives_the_step_the_outer_loop_and_the_run_in_human_units(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    stream = io.StringIO()
    display = progress.Progress(config.Config(inner_steps=100, outer_steps=13), 172_800, 0, stream, interactive=False)
    display.begin_outer(1)
    run_steps(display, clock, 1)  # the first step compiles: no estimate from it
    assert capsys.readouterr().out == ""
    run_steps(display, clock, 1, first=0.2)
    assert capsys.readouterr().out == (
        "speed: 0.2 s per step of 172,800 images (864,000 img/s); an outer loop of 100 steps takes about 20 s, "
        "the whole run of 1,300 steps about 4 min\n")
    # In a log file, a plain line at most every 30 s: at step 2, then at step 152 (in the next outer loop).
    run_steps(display, clock, 98, first=0.2)
    display.outer_done(49.8, 1)
    display.begin_outer(2)
    run_steps(display, clock, 100, first=0.2)
    assert stream.getvalue().splitlines() == [
        "outer 1/13: step 2/1,300 (2 of 100 in this outer loop), 864,000 img/s, outer loop left 20 s, run left 4 min",
        "outer 2/13: step 152/1,300 (52 of 100 in this outer loop), 864,000 img/s, outer loop left 9.6 s, "
        "run left 4 min"]


def test_on_the_cpu_a_run_of_hours_says_so_and_names_the_reduced_scale_flags(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    display = progress.Progress(config.Config(), 172_800, 0, io.StringIO(), interactive=False)
    display.begin_outer(1)
    run_steps(display, clock, 2, first=200, each=110)  # about the 2-core CPU's speed at the blog's batch
    line = capsys.readouterr().out
    assert "an outer loop of 100 steps takes about 3.1 h, the whole run of 1,300 steps about 39.7 h" in line
    assert "a reduced-scale run (--train-examples 256 --inner-steps 10 --outer-steps 8) takes minutes" in line


def test_a_terminal_gets_a_bar_and_short_outer_loops_get_nothing(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    stream = io.StringIO()
    display = progress.Progress(config.Config(inner_steps=100, outer_steps=13), 2048, 0, stream, interactive=True)
    display.begin_outer(1)
    run_steps(display, clock, 5)
    display.outer_done(20.0, 1)
    assert "outer 1/13" in stream.getvalue() and "step" in stream.getvalue()  # tqdm's bar
    quiet = io.StringIO()
    display = progress.Progress(config.Config(inner_steps=10, outer_steps=3), 2048, 0, quiet, interactive=False)
    display.begin_outer(1)
    run_steps(display, clock, 10, first=1, each=0.01)  # an outer loop of a tenth of a second
    assert quiet.getvalue() == ""


def test_the_compiled_loop_is_estimated_from_its_second_outer_loop(capsys):
    display = progress.Progress(config.Config(inner_steps=100, outer_steps=13), 172_800, 0, io.StringIO())
    display.begin_outer(1)
    display.outer_done(50.0, 1)  # compilation included: no estimate
    assert capsys.readouterr().out == ""
    display.begin_outer(2)
    display.outer_done(18.4, 2)
    assert "0.184 s per step" in capsys.readouterr().out and display.done == 200


def test_where_dispatch_waits_for_the_work_the_estimate_takes_no_step_time_from_an_outer_loops_ends(capsys,
                                                                                                   monkeypatch):
    """On the CPU a step's dispatch returns when it has run, so the loop reports step 1 after step 2 ran, and
    step 2 at once after: an outer loop of 2 steps gives no step's time; its second outer loop does."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    display = progress.Progress(config.Config(inner_steps=2, outer_steps=3), 512, 0, io.StringIO())
    for outer, (first, last) in enumerate([(30.0 + 4.0, 0.0), (4.0, 0.0), (4.0, 0.0)], start=1):
        display.begin_outer(outer)
        clock.now += first
        display.step()  # step 1, reported after step 2 ran (the first compiles too)
        clock.now += last
        display.step()  # step 2, reported at once
        display.outer_done(first + last if outer > 1 else 34.0, outer)
        assert display.done == 2 * outer
        assert capsys.readouterr().out == ("" if outer != 2 else "speed: 2 s per step of 512 images (256 img/s); an "
                                           "outer loop of 2 steps takes about 4.0 s, the whole run of 6 steps about "
                                           "12 s\n")


def test_curves_are_redrawn_at_most_once_a_minute_and_once_more_when_the_run_ends(tmp_path, monkeypatch):
    clock, drawn = Clock(), []
    clock.now = 1000.0  # the minute counts from the log's start, not from the clock's zero
    monkeypatch.setattr(metrics.time, "monotonic", clock)
    monkeypatch.setattr(metrics, "write_curves", lambda path, records, config: drawn.append(len(records)))
    with metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), {"config": {}}, None) as log:
        # Records 3 (at 60 s) and 6 (125 s) come a minute after a drawing; record 5 (119 s) does not.
        for outer, seconds in enumerate((20, 30, 10, 5, 54, 6), 1):
            clock.now += seconds
            log.write({"outer": outer, "validation_accuracy": 0.5})
            log.write({"summary": {}})  # not a record: no curve point
        assert drawn == [3, 6]
    assert drawn == [3, 6]  # nothing new to draw at the end
    with metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), {"config": {}}, None) as log:
        log.write({"outer": 1, "validation_accuracy": 0.5})
        assert drawn == [3, 6]
    assert drawn == [3, 6, 1]  # a short run: drawn when it ends


def test_a_picture_that_cannot_be_drawn_does_not_hide_why_the_run_ended(tmp_path, monkeypatch, capsys):
    def broken(path, records, config):
        raise OSError("No space left on device")
    monkeypatch.setattr(metrics, "write_curves", broken)
    with pytest.raises(errors.Interrupted):
        with metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), {"config": {}}, None) as log:
            log.write({"outer": 1, "validation_accuracy": 0.5})
            raise errors.Interrupted(15, "during outer loop 2")
    assert "curves.png not drawn: OSError: No space left on device" in capsys.readouterr().err
    with pytest.raises(OSError):  # a run that ended well reports it
        with metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), {"config": {}}, None) as log:
            log.write({"outer": 1, "validation_accuracy": 0.5})


def test_the_outer_line_names_the_raw_and_the_averaged_params_accuracies():
    import metrics
    record = {"outer": 2, "step": 20, "loss": 1.0, "train_accuracy": 0.5, "validation_accuracy": 0.2,
              "raw_validation_accuracy": 0.1, "ema_validation_accuracy": 0.2, "learning_rate": 0.01,
              "gradient_norm": 1.0, "update_ratios": {"a": 0.01}, "inner_seconds": 1.0, "images_per_second": 10.0,
              "elapsed_seconds": 2.0, "b_simple": 12.5, "set_over_b_simple": 8.0}
    line = metrics.outer_line(5, record, {"validation_accuracy": 0.2, "outer": 2}, first=False)
    assert "val acc 0.2000 (raw 0.1000, ema 0.2000) (best 0.2000 @ outer 2)" in line
    assert "| B_simple 12 img (set/B 8.0) |" in line
