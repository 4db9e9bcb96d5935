"""The training clock: it counts only between start() and pause(), and waits for a GPU only when
paused (the trainers' time per step and train_s come from it)."""
from types import SimpleNamespace

import train_helpers
from train_helpers import TrainClock


def test_clock_counts_running_time_only_and_syncs_only_when_paused(monkeypatch):
    now, syncs = [0.0], []
    monkeypatch.setattr(train_helpers.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(train_helpers.torch.cuda, "synchronize", lambda: syncs.append(now[0]))
    clock = TrainClock("cuda", seconds=100.0)         # a resumed run's seconds carry on
    clock.start()
    now[0] = 2.0
    clock.start()                                      # already running: keeps its start
    now[0] = 3.0
    assert clock.pause() == 103.0 and syncs == [3.0]
    now[0] = 10.0                                      # paused (an evaluation): not counted
    assert clock.pause() == 103.0 and syncs == [3.0]   # nothing queued since: no sync
    clock.start()
    now[0] = 10.5
    assert clock.pause() == 103.5 and clock.seconds == 103.5


def test_clock_never_syncs_off_cuda(monkeypatch):
    now = [5.0]
    monkeypatch.setattr(train_helpers.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(train_helpers.torch.cuda, "synchronize", lambda: 1 / 0)   # would raise
    clock = TrainClock("cpu")
    clock.start()
    now[0] = 7.5
    assert clock.pause() == 2.5


def test_loss_far_above_a_uniform_guess_is_a_warning():
    assert train_helpers.loss_far_above_chance(10.8, 50257) is None      # where BPE starts
    warning = train_helpers.loss_far_above_chance(35.7, 50257)           # the blow-up
    assert warning.startswith("warning: the training loss 35.70 is far above") and \
        "ln(50,257) = 10.82" in warning and "lower --lr" in warning
    assert train_helpers.loss_far_above_chance(float("nan"), 10) is None  # divergence's own path


def test_a_fallback_run_is_named_after_the_data_it_has():
    assert train_helpers.data_name("shakespeare_char", "tinyshakespeare") == "shakespeare_char"
    assert train_helpers.data_name("shakespeare_char", "pydoc_topics") == \
        "pydoc_topics-fallback"
    assert train_helpers.data_name("fashion_mnist", "digits") == "digits-fallback"
    assert train_helpers.data_name("digits", "digits") == "digits"       # asked for by name


def test_progress_times_the_steps_since_the_last_line_and_warns_once(monkeypatch, capsys):
    """ms per step covers only the steps since the last log line (a resumed run's first line
    counts from the resumed step), and an evaluation in between is not timed; a warning is
    said once, by rank 0 only."""
    now = [0.0]
    monkeypatch.setattr(train_helpers.time, "perf_counter", lambda: now[0])
    main = SimpleNamespace(main=True)
    progress = train_helpers.Progress(main, "cpu", total=100, step=40, train_s=8.0)
    progress.clock.start()
    now[0] = 0.5                                       # 10 steps in 0.5 s
    assert progress.lap(50) == (8.5, 50.0)
    now[0] = 3.0                                       # an evaluation: the clock is paused
    progress.clock.start()
    now[0] = 3.25                                      # 5 steps in 0.25 s
    assert progress.lap(55) == (8.75, 50.0)
    progress.warn_once("warning: high")
    progress.warn_once("warning: high")
    other = train_helpers.Progress(SimpleNamespace(main=False), "cpu", 100, 0, 0.0)
    other.warn_once("warning: high")
    progress.bar.close()
    other.bar.close()
    assert capsys.readouterr().err.count("warning: high") == 1
