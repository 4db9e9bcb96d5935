"""The training clock: it counts only between start() and pause(), and waits for a GPU only when
paused (the trainers' time per step and train_s come from it)."""
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
