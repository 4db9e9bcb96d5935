"""The studies' protocol: t intervals over paired seeds, the lr x weight decay tuning search and
its grid extension, the regime every run and table states, the lr schedules, and the studies
built from tuned settings."""
import dataclasses
import json
import math
import os
from concurrent.futures import Future

import pytest
import scipy.stats

import nanogpt_sai
import optim
import stats
import sweep
from cli import config_changes
from fake_data import write_corpus
from plots import studies
from plots.figures import regime_facts
from run_helpers import is_png
from train_helpers import lr_at


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 30, 200])
def test_t_quantile_matches_scipy(df):
    assert stats.t_quantile(0.95, df) == pytest.approx(scipy.stats.t.ppf(0.975, df), rel=1e-9)
    assert stats.t_coverage(1.7, df) == pytest.approx(1 - 2 * scipy.stats.t.sf(1.7, df),
                                                      abs=1e-12)


def test_paired_difference_by_hand():
    # differences 1, 2, 3: mean 2, sd 1; with 2 degrees of freedom t(0.975) has the closed form
    # (2p - 1) sqrt(2 / (4 p (1 - p))) at p = 0.975
    t2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    diff = stats.paired_difference({1: 3.0, 2: 5.0, 3: 7.0, 9: 1.0}, {1: 2.0, 2: 3.0, 3: 4.0})
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(2.0)      # seed 9 is not paired
    assert diff["low"] == pytest.approx(2 - t2 / math.sqrt(3))
    assert diff["high"] == pytest.approx(2 + t2 / math.sqrt(3))
    assert not diff["significant"] and stats.describe(diff).endswith(", not significant")
    tight = stats.paired_difference({1: 1.10, 2: 1.21, 3: 1.30}, {1: 1.0, 2: 1.1, 3: 1.2})
    assert tight["significant"] and tight["low"] > 0
    assert stats.describe(tight) == (f"+0.103 (95% CI {tight['low']:+.3f} .. "
                                     f"{tight['high']:+.3f})")
    assert stats.describe(stats.paired_difference({1: 2.0}, {1: 1.5})) == \
        "+0.500 (1 seed: no interval)"


def _search(loss, max_extra):
    """Run sweep.next_trials to its end on a loss over lattice points; (tried, why)."""
    tried = {(i, j): loss(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
    while True:
        points, why = sweep.next_trials(tried, max_extra)
        if why:
            return tried, why
        tried.update({p: loss(*p) for p in points})


def test_tuning_extends_the_grid_until_the_best_is_interior():
    # the best lr 4 steps above the start's centre (factor 16), wd one step below
    tried, why = _search(lambda i, j: (i - 4) ** 2 + 0.5 * (j + 1) ** 2, max_extra=20)
    best = min(tried, key=tried.get)
    assert why == "interior" and best == (4, -1)
    assert all((best[0] + di, best[1] + dj) in tried for di, dj in sweep.NEIGHBOURS)
    assert sweep.edges(tried, best) == []
    # a centre that is already best needs no extra trial
    tried, why = _search(lambda i, j: i * i + j * j, max_extra=0)
    assert why == "interior" and len(tried) == 9


def test_tuning_says_when_the_cap_leaves_the_best_on_an_edge():
    tried, why = _search(lambda i, j: (i - 10) ** 2 + j * j, max_extra=3)
    best = min(tried, key=tried.get)
    assert why == "cap" and len(tried) <= 9 + 3
    assert "lr above" in sweep.edges(tried, best)


def test_diverged_trials_bound_the_search():
    # above lr step 1 every run diverges (inf): the best is the highest stable lr, interior
    tried, why = _search(lambda i, j: math.inf if i > 1 else -i + 0.1 * j * j, max_extra=6)
    assert why == "interior" and min(tried, key=tried.get) == (1, 0)
    assert tried[(2, 0)] == math.inf


def fake_row(loss, run):
    """A stand-in for training: the run 'finishes' with loss(setting, seed)."""
    return dict(setting=run.setting, seed=run.seed, status="finished", run_dir=run.run_dir,
                final_val_loss=loss(run.setting, run.seed), best_val_loss=0.0, seen=100,
                n_params=50, train_s=1.0, state_bytes=8)


def fake_start(loss):
    """sweep.tune's start(run), each run ended at once."""
    def start(run):
        future = Future()
        future.set_result(fake_row(loss, run))
        return future
    return start


def bowl(optimum):
    """A final loss with its minimum at optimum[name] = (lr, weight decay), log-quadratic around
    it, 0.01 higher per seed."""
    def loss(setting, seed):
        lr, wd = optimum[setting["optimizer"]]
        return (2 + math.log2(float(setting["lr"]) / lr) ** 2
                + math.log(float(setting["weight_decay"]) / wd) ** 2 + 0.01 * seed)
    return loss


def test_tune_picks_each_optimizers_best_and_reruns_it_on_fresh_seeds(tmp_path):
    """sweep.tune end to end, training replaced by a loss with a known optimum: sgd_sai's at
    the lattice's lr 0.08 (two steps above its default 2e-2), weight decay 0.0333."""
    loss = bowl({"adamw": (0.004, 0.1), "sgd_sai": (0.08, 0.0333)})

    cfg = sweep.SweepConfig(tune="adamw,sgd_sai", seeds="1,2,3", max_extra=6)
    rows, report = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path),
                              fake_start(loss))
    assert report["adamw"]["trials"] == 9 and report["adamw"]["ended"] == "interior"
    assert report["sgd_sai"]["setting"] == {"optimizer": "sgd_sai", "lr": "0.08",
                                            "weight_decay": "0.0333"}
    assert report["sgd_sai"]["ended"] == "interior" and report["sgd_sai"]["trials"] > 9
    with open(tmp_path / "tuned.json") as f:
        assert json.load(f) == {"adamw": {"lr": "0.004", "weight_decay": "0.1"},
                                "sgd_sai": {"lr": "0.08", "weight_decay": "0.0333"}}
    finals = [r for r in rows if r.get("final")]
    assert sorted((r["setting"]["optimizer"], r["seed"]) for r in finals) == [
        ("adamw", 1), ("adamw", 2), ("adamw", 3), ("sgd_sai", 1), ("sgd_sai", 2), ("sgd_sai", 3)]
    assert all(r["seed"] == cfg.tune_seed for r in rows if not r.get("final"))
    table = sweep.tune_summary(report, finals, str(tmp_path), {"optimizer": "adamw"})
    adamw, sgd = [line for line in table.splitlines() if line.startswith("| adamw")
                  or line.startswith("| sgd_sai")]
    assert "| 9 | 0.004 | 0.1 | interior | 2.02 ± 0.01 (3 of 3 seeds) | baseline |" in adamw
    # the same loss at both optima: the seed-paired difference is exactly 0
    assert "+0.000 (95% CI +0.000 .. +0.000), not significant" in sgd


def test_tuning_keeps_every_job_busy_and_its_answer_does_not_depend_on_timing(tmp_path,
                                                                              monkeypatch):
    """Two jobs on a simulated clock (sweep.wait replaced: the run under way that ends first
    ends; a run takes 1 + lr x 100 time units, so runs end out of order): adamw's search ends
    after its 9 start trials while sgd_sai's extends, and adamw's final runs fill the job its
    trials leave free, where rounds would leave it idle. The runs, rows and report equal those
    of one job with every run ended at once."""
    loss = bowl({"adamw": (0.004, 0.1), "sgd_sai": (0.32, 0.0111)})

    cfg = sweep.SweepConfig(tune="sgd_sai,adamw", seeds="1,2,3", max_extra=12)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    expected = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path / "one"),
                          fake_start(loss))
    clock, ends, log = [0.0], {}, []

    def start(run):
        future = Future()
        ends[future] = (clock[0] + 1 + 100 * float(run.setting["lr"]), run)
        log.append(("start", clock[0], run))
        return future

    def wait(futures, return_when):
        first = min(futures, key=lambda f: ends[f][0])
        clock[0], run = ends.pop(first)
        log.append(("end", clock[0], run))
        first.set_result(fake_row(loss, run))
        return {first}, set(futures) - {first}

    monkeypatch.setattr(sweep, "wait", wait)
    rows, report = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path / "two"),
                              start, jobs=2)
    assert list(report.items()) == list(expected[1].items())
    assert [(r["setting"], r["seed"], r.get("final")) for r in rows] == \
        [(r["setting"], r["seed"], r.get("final")) for r in expected[0]]
    assert report["sgd_sai"]["trials"] > 9 and report["adamw"]["trials"] == 9

    def key(setting):
        return setting["optimizer"], setting["lr"], setting["weight_decay"]

    # trials first, in the order decided: both 3 x 3 starts before sgd_sai's first extension
    assert [r["setting"]["optimizer"] for r in expected[0][-12:]] == ["adamw"] * 12
    first_18 = {key(r.setting) for r in [r for e, _, r in log if e == "start"][:18]}
    assert first_18 == {key(r["setting"]) for r in expected[0][:9] + expected[0][-12:-3]}
    under_way = 0
    for event, time, run in log:      # two at a time, never more
        under_way += 1 if event == "start" else -1
        assert under_way <= 2
    last_sgd_trial = max(t for e, t, r in log if e == "end" and r.setting["optimizer"] ==
                         "sgd_sai" and r.seed == cfg.tune_seed)
    first_adamw_final = min(t for e, t, r in log if e == "start" and r.seed != cfg.tune_seed
                            and r.setting["optimizer"] == "adamw")
    assert first_adamw_final < last_sgd_trial


def test_tuning_refuses_its_own_seed_among_the_final_seeds(capsys):
    assert sweep.main(["--tune=adamw", "--seeds=1337,1"]) == 2
    assert "--seeds=1337,1 includes --tune_seed=1337" in capsys.readouterr().err
    assert sweep.main(["--tune=adamw", "--tune_centre=adamw=4e-3"]) == 2
    assert "--tune_centre: 'adamw=4e-3' is not name=lr,weight_decay" in capsys.readouterr().err


def test_a_pinned_centre_moves_the_start(tmp_path):
    cfg = sweep.SweepConfig(tune="adamw", seeds="1", tune_centre="adamw=1e-3,0.5")
    rows, _ = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path),
                         fake_start(lambda setting, seed: float(setting["lr"])))
    first = {(r["setting"]["lr"], r["setting"]["weight_decay"]) for r in rows[:9]}
    assert first == {(lr, wd) for lr in ("0.0005", "0.001", "0.002")
                     for wd in ("0.167", "0.5", "1.5")}


def test_studies_of_tuned_settings_read_tuned_json(tmp_path, capsys):
    (tmp_path / "tuned.json").write_text(json.dumps(
        {"adamw": {"lr": "0.004", "weight_decay": "0.1"},
         "sgd_sai": {"lr": "0.02", "weight_decay": "0.3"}}))
    cfg = sweep.SweepConfig(tuned=str(tmp_path))
    assert sweep.expand_grid("{tuned} max_iters=250 | {tuned} max_iters=500", cfg) == (
        "optimizer=adamw weight_decay=0.1 lr=0.004 max_iters=250 | "
        "optimizer=sgd_sai weight_decay=0.3 lr=0.02 max_iters=250 | "
        "optimizer=adamw weight_decay=0.1 lr=0.004 max_iters=500 | "
        "optimizer=sgd_sai weight_decay=0.3 lr=0.02 max_iters=500")
    batch = sweep.parse_grid(sweep.expand_grid(
        "{batch}", sweep.SweepConfig(tuned=str(tmp_path), optimizers="sgd_sai")))
    by_size = {}
    for s in batch:
        by_size.setdefault(int(s["batch_size"]), []).append(s)
    for size, settings in by_size.items():   # equal tokens; lr x (B / 12) ** 0, 0.5, 1
        assert {int(s["max_iters"]) * size for s in settings} == {4000 * 12}
        want = {f"{0.02 * (size / 12) ** k:.3g}" for k in (0, 0.5, 1)}
        assert {f"{float(s['lr']):.3g}" for s in settings} == want
    assert sweep.main(["--study=duration", f"--tuned={tmp_path / 'none'}"]) == 2
    assert "no tuned.json there; run python sweep.py --study=tune" in capsys.readouterr().err
    assert sweep.main(["--study=duration", f"--tuned={tmp_path}", "--optimizers=muon"]) == 2
    assert "--optimizers: muon not tuned" in capsys.readouterr().err


def test_the_v2_batch_study_has_the_full_square_root_rule_and_fixed_evaluation(tmp_path):
    """{batch_v2}: at every batch size AdamW at a fixed lr, at lr x sqrt(k), and at the full
    rule (lr x sqrt(k), 1 - beta and eps scaled by k and 1 / sqrt(k)); SGD-SaI's lr rules;
    equal tokens; the preset fixes the evaluation batch, so every size is evaluated alike."""
    (tmp_path / "tuned.json").write_text(json.dumps(
        {"adamw": {"lr": "0.004", "weight_decay": "0.1"},
         "sgd_sai": {"lr": "0.02", "weight_decay": "0.0111"}}))
    settings = sweep.parse_grid(sweep.expand_grid("{batch_v2}", sweep.SweepConfig(
        tuned=str(tmp_path))))
    full = [s for s in settings if "beta1" in s]
    assert [int(s["batch_size"]) for s in full] == [24, 48, 96]
    for s in full:
        k = int(s["batch_size"]) / 12
        assert s["optimizer"] == "adamw" and int(s["max_iters"]) * k == 4000
        assert float(s["lr"]) == pytest.approx(0.004 * k ** 0.5, rel=3e-3)   # 3 figures
        assert 1 - float(s["beta1"]) == pytest.approx(0.1 * k, rel=1e-3)
        assert 1 - float(s["beta2"]) == pytest.approx(0.01 * k, rel=1e-3)
        assert float(s["eps"]) == pytest.approx(1e-8 / k ** 0.5, rel=3e-3)
    adamw_96 = {s["lr"] for s in settings if s["optimizer"] == "adamw" and "beta1" not in s
                and s["batch_size"] == "96"}
    assert adamw_96 == {"0.004", "0.0113"}                            # fixed and sqrt lr only
    assert "eval_batch_size=12" in sweep.STUDIES["batch_v2"]["set"]
    cfg = nanogpt_sai.resolve_config(["--device=cpu", "--optimizer=adamw", "--eps=3.5e-9"])
    assert optim.trainer_hparams("adamw", cfg)["eps"] == 3.5e-9
    assert "eps" not in optim.trainer_hparams("adamw", nanogpt_sai.resolve_config(
        ["--device=cpu", "--optimizer=adamw"]))                        # 0: the optimizer's own


def test_an_option_added_since_a_run_at_its_default_is_not_another_option(tmp_path):
    """A sweep resumed after the trainer gained an option: runs made before it, where the new
    option is at its default, are the same runs; at another value they are not."""
    cfg = dataclasses.asdict(nanogpt_sai.resolve_config(["--device=cpu"]))
    saved = {k: v for k, v in cfg.items() if k != "eval_batch_size"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    defaults = dataclasses.asdict(nanogpt_sai.Config())
    assert config_changes(str(tmp_path), cfg, defaults) == []
    assert config_changes(str(tmp_path), cfg) == ["eval_batch_size: (none) -> 0"]
    assert config_changes(str(tmp_path), dict(cfg, eval_batch_size=12), defaults) == [
        "eval_batch_size: (none) -> 12"]


def test_regime_counts_tokens_per_parameter_and_epochs():
    config = dict(batch_size=12, block_size=64, grad_accum=2, max_iters=1000)
    facts = regime_facts(config, {"n_params": 800_000, "n_params_non_embedding": 780_000})
    assert facts["seen"] == 12 * 64 * 2 * 1000
    assert facts["per_param"] == pytest.approx(1_536_000 / 800_000)
    assert facts["x_optimal"] == pytest.approx(1_536_000 / 800_000 / 20)
    assert "epochs" not in facts                  # run.json without the training split's size
    facts = regime_facts(config, {"n_params": 800_000, "train_tokens": 1_003_854})
    assert facts["epochs"] == pytest.approx(1_536_000 / 1_003_854)   # tiny shakespeare: 1.53
    vit = regime_facts(dict(patch_size=4, batch_size=128, max_iters=0, epochs=3),
                       {"n_params": 140_000, "n_train": 55_000})
    assert vit["seen"] == 165_000 and "x_optimal" not in vit and vit["epochs"] == 3


def test_p_values_match_scipy_and_holm_adjusts_them_by_hand():
    diffs = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25, 5: 0.05}
    diff = stats.paired_difference(diffs, {s: 0.0 for s in diffs})
    assert diff["p"] == pytest.approx(scipy.stats.ttest_1samp(list(diffs.values()), 0).pvalue,
                                      rel=1e-9)
    # sorted 0.01, 0.03, 0.04, 0.5 of 4 tests: x4, x3, x2, x1, then never below an earlier one
    assert stats.holm([0.01, 0.04, None, 0.03, 0.5]) == pytest.approx(
        [0.04, 0.09, None, 0.09, 0.5])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]


def test_an_equal_budget_spends_the_same_trials_by_the_same_rule():
    """budget_trials: every search ends at exactly the budget, however far its optimum lies;
    with the optimum inside the start, the budget goes to the best point's neighbours."""
    for loss in (lambda i, j: (i - 4) ** 2 + (j + 1) ** 2, lambda i, j: i * i + j * j,
                 lambda i, j: math.inf if i > 0 else -i):
        tried = {(i, j): loss(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)}
        while True:
            points, why = sweep.budget_trials(tried, 15)
            if why:
                break
            tried.update({p: loss(*p) for p in points})
        assert why == "budget" and len(tried) == 15
    tried = {(i, j): (i - 4) ** 2 + (j + 1) ** 2 for i in (-1, 0, 1) for j in (-1, 0, 1)}
    points, _ = sweep.budget_trials(tried, 15)
    assert points == [(2, -1), (1, -2)]   # the best, (1, -1): its untried lr above, wd below


def test_tuning_with_a_budget_gives_every_optimizer_the_same_trials(tmp_path):
    loss = bowl({"adamw": (0.004, 0.1), "sgd_sai": (0.32, 0.0333)})   # sgd_sai's far above
    cfg = sweep.SweepConfig(tune="adamw,sgd_sai", seeds="1,2", budget=12)
    rows, report = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path),
                              fake_start(loss))
    assert [r["trials"] for r in report.values()] == [12, 12]
    assert sum(not r.get("final") for r in rows) == 24
    assert report["adamw"]["edges"] == [] and "lr above" in report["sgd_sai"]["edges"]
    table = sweep.tune_summary(report, [r for r in rows if r.get("final")], str(tmp_path),
                               {"optimizer": "adamw"})
    assert "until 12 trials each" in table and "| budget spent: lr above" in table
    assert "| vs adamw | p | Holm p |" in table


def test_run_json_counts_non_embedding_parameters(tmp_path):
    text = write_corpus(tmp_path / "input.txt")
    out = tmp_path / "run"
    assert nanogpt_sai.main(["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
                             "--batch_size=4", "--max_iters=2", "--eval_iters=1",
                             "--sample_tokens=0", "--device=cpu", f"--data_path={text}",
                             f"--data_dir={tmp_path / 'cache'}", f"--out_dir={out}"]) == 0
    with open(os.path.join(out, "run.json")) as f:
        info = json.load(f)
    # token embedding (tied with the head) and position embedding left out
    assert info["n_params"] - info["n_params_non_embedding"] == info["vocab_size"] * 16 + 16 * 16


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "wsd_sqrt"])
def test_schedules_warm_up_and_end_at_the_floor(schedule):
    lrs = [lr_at(it, 1.0, 10, 110, 0.1, schedule, cooldown=0.2) for it in range(120)]
    assert lrs[9] == pytest.approx(10 / 11) and lrs[10] == 1.0     # warmup, then the peak
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))   # never rises again
    if schedule.startswith("wsd"):    # stable until the last 20 of the 100 decay steps
        assert lrs[90] == 1.0 and lrs[91] < 1.0
        half = 1 - (0.5 if schedule == "wsd" else math.sqrt(0.5))
        assert lrs[100] == pytest.approx(0.1 + half * 0.9)
    if schedule == "linear":
        assert lrs[60] == pytest.approx(0.1 + 0.5 * 0.9)


def test_a_bad_schedule_is_a_clear_error(tmp_path, capsys):
    assert nanogpt_sai.main(["--schedule=step", f"--out_dir={tmp_path}"]) == 2
    assert "--schedule must be one of cosine, linear, wsd, wsd_sqrt, got 'step'" in \
        capsys.readouterr().err
    assert nanogpt_sai.main(["--schedule=wsd", "--cooldown=0", f"--out_dir={tmp_path}"]) == 2
    assert "--cooldown must be in (0, 1]" in capsys.readouterr().err


def test_batch_rule_is_read_back_from_the_lr():
    for batch, k, rule in ((3, 0, "none"), (3, 0.5, "sqrt"), (24, 1, "linear"), (6, 0.5, "sqrt")):
        lr = float(f"{0.004 * (batch / 12) ** k:.3g}")   # as sweep.expand_grid writes it
        assert studies.batch_rule({"batch_size": str(batch), "lr": str(lr)}, 12, 0.004) == rule
    assert studies.batch_rule({"batch_size": "12", "lr": "0.004"}, 12, 0.004) == "base"
    full = sweep.full_sqrt_rule(0.004, 48).split()   # lr x 2, as the lr-only rule's
    setting = {"batch_size": "48"} | dict(item.split("=") for item in full)
    assert studies.batch_rule(setting, 12, 0.004) == "full sqrt"


def test_duration_and_batch_figures_draw_from_runs(tmp_path):
    rows = []
    for name, offset in (("adamw", 0.0), ("sgd_sai", 0.2)):
        for steps in (250, 500, 1000):
            for seed in (1, 2, 3):
                rows.append(dict(setting={"optimizer": name, "max_iters": str(steps)}, seed=seed,
                                 status="finished", run_dir=str(tmp_path / "none"),
                                 final_val_loss=3 - 0.3 * math.log2(steps / 250) + offset
                                 + 0.01 * seed, seen=steps * 768, n_params=800_000))
    assert is_png(studies.duration_curves(rows, str(tmp_path / "duration.png")))
    rows = []
    for batch, lrs in ((12, ["0.004"]), (24, ["0.004", "0.00566", "0.008", "full"])):
        for lr in lrs:
            run_dir = tmp_path / f"b{batch}-{lr}"
            run_dir.mkdir()
            steps = 24_000 // batch
            (run_dir / "config.json").write_text(json.dumps(dict(
                dataset="shakespeare_char", batch_size=batch, block_size=64, grad_accum=1,
                max_iters=steps)))
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps(dict(event="eval", step=s, tokens=s * batch * 64,
                                val_loss=4 - s / steps)) + "\n" for s in (0, steps // 2, steps)))
            setting = {"optimizer": "adamw", "batch_size": str(batch), "lr": lr}
            if lr == "full":   # the full square-root rule: its own panel
                setting |= dict(item.split("=") for item in sweep.full_sqrt_rule(0.004, batch)
                                .split())
            rows.append(dict(setting=setting, seed=1, status="finished", run_dir=str(run_dir)))
    assert is_png(studies.batch_rule_curves(rows, str(tmp_path / "batch.png")))


def _row(seed, loss, **setting):
    return dict(setting=setting, seed=seed, status="finished", run_dir="/nonexistent",
                final_val_loss=loss, best_val_loss=loss, seen=100, n_params=10, train_s=1.0,
                state_bytes=8)


def test_each_length_is_compared_with_adamw_at_that_length(tmp_path):
    rows = []
    for steps, base in (("250", 3.0), ("500", 2.5)):
        for seed in (1, 2, 3):
            rows += [_row(seed, base + 0.01 * seed, optimizer="adamw", lr="0.004", max_iters=steps),
                     _row(seed, base + 0.1 + 0.02 * seed, optimizer="sgd_sai", lr="0.02",
                          max_iters=steps)]
    text = sweep.summarize(rows, str(tmp_path), {"optimizer": "adamw"})
    assert "at the same max_iters" in text
    sgd = [line for line in text.splitlines() if line.startswith("| sgd_sai")]
    # per length: differences 0.11, 0.12, 0.13 against AdamW at the same length, not the best
    # AdamW overall (500 steps), which would make the 250-step row +0.62
    assert all("+0.120 (95% CI" in line for line in sgd)


def test_an_lr_sweep_is_compared_with_adamw_at_its_best_lr(tmp_path):
    rows = []
    for seed in (1, 2):
        rows += [_row(seed, 2.0, optimizer="adamw", lr="1e-3"),
                 _row(seed, 1.8 + 0.01 * seed, optimizer="adamw", lr="4e-3"),
                 _row(seed, 1.9, optimizer="muon", lr="1e-2")]
    text = sweep.summarize(rows, str(tmp_path), {"optimizer": "adamw"})
    assert ("Baseline: optimizer=adamw lr=4e-3 (the best setting matching --baseline, chosen on "
            "validation)") in text
    muon = next(line for line in text.splitlines() if line.startswith("| muon"))
    assert "+0.085 (95% CI" in muon


def test_a_selection_grid_chooses_each_lr_on_val_and_reports_test_only_there(tmp_path):
    rows = []
    for seed in (1, 2, 3):
        # Adam's best val lr (3e-3) is not its best test lr (1e-2): test must not choose it
        for lr, val, test in (("1e-3", 2.5, 2.6), ("3e-3", 2.0, 2.3), ("1e-2", 2.1, 2.0)):
            rows.append(_row(seed, val + 0.01 * seed, optimizer="adam_pe", preconditioner="batch",
                             lr=lr) | dict(final_test_loss=test + 0.01 * seed))
        for lr, val in (("1e-3", 2.4), ("3e-3", 2.2)):   # its best is its largest lr tried
            rows.append(_row(seed, val, optimizer="adam_pe", preconditioner="variance", lr=lr)
                        | dict(final_test_loss=val + 0.2 + 0.02 * seed))
    chosen, lines = sweep.select_on_val(rows, ["lr"])
    assert sorted({(r["setting"]["preconditioner"], r["setting"]["lr"]) for r in chosen}) == [
        ("batch", "3e-3"), ("variance", "3e-3")]
    assert lines == ["- optimizer=adam_pe preconditioner=batch: lr=3e-3 of 1e-3, 3e-3, 1e-2",
                     "- optimizer=adam_pe preconditioner=variance: lr=3e-3 of 1e-3, 3e-3 (an "
                     "edge: the best may lie beyond)"]
    summary = sweep.summarize(rows, str(tmp_path), None, test=False)
    assert "test" not in summary.split("Compute:")[0].lower()
    text = sweep.selected_summary(rows, str(tmp_path), {"preconditioner": "batch"}, ["lr"])
    assert "preconditioner=batch lr=3e-3 (the best setting" in text
    # variance at 3e-3 against batch at 3e-3 on test: (2.4 + 0.02 s) - (2.3 + 0.01 s), s = 1..3
    variance = next(line for line in text.splitlines() if "| variance |" in line)
    assert "+0.120 (95% CI" in variance
    assert len([line for line in text.splitlines() if line.startswith("| adam_pe")]) == 2
    assert (tmp_path / "selected.md").read_text().strip() == text.strip()


def test_select_refuses_a_key_the_grid_never_sets(tmp_path, capsys):
    code = sweep.main(["--grid=optimizer=adamw lr=1e-3,3e-3", "--select=momentum",
                       f"--sweep_dir={tmp_path}", "--set=max_iters=2"])
    assert code == 2
    assert "--select=momentum: the grid never sets momentum" in capsys.readouterr().err


def test_a_study_says_what_it_cost():
    rows = [dict(wall_s=1800.0, threads=1), dict(wall_s=5400.0, threads=1), dict(status="x")]
    assert sweep.compute_line(rows) == ("Compute: 3 runs, 2.00 hours of wall-clock time at 1 "
                                        "thread each.")
    assert sweep.compute_line([dict(wall_s=3600.0, threads=2)]).endswith("at 2 threads each.")


def test_a_resumed_runs_wall_time_adds_its_processes(tmp_path):
    """wall_s counts from its process's start: a run stopped at 300 s and resumed for 400 s
    took 700 s, not the larger of the two."""
    records = [dict(event="train", step=10, wall_s=5.0),
               dict(event="train", step=100, wall_s=300.0),
               dict(event="train", step=200, wall_s=20.0),      # resumed from step 100
               dict(event="train", step=250, wall_s=400.0),
               dict(event="end", step=250, status="finished", train_s=650.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = sweep.run_result(str(tmp_path), {"optimizer": "adamw"}, 1, "finished")
    assert row["wall_s"] == 700.0
    assert sweep.compute_line([dict(row, threads=1)]).startswith("Compute: 1 runs, 0.19 hours")


def ended_run(run, loss):
    """A run directory as a finished GPT run leaves it, as far as a sweep reads it."""
    run_dir = run.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(run.config, f)
    records = [dict(event="eval", step=10, val_loss=loss, best_val_loss=loss, tokens=100,
                    train_s=1.0, state_bytes=8, wall_s=2.0),
               dict(event="end", step=10, status="finished", train_s=1.0)]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(dict(n_params=50, threads=1), f)


def test_a_redraw_walks_each_search_as_far_as_its_trials_have_ended(tmp_path, capsys):
    """--redraw of a tuning study stopped part way: each optimizer's search is walked over its
    ended trials and stops at the first it lacks (the others' go on), nothing runs, the trials
    table says what is missing; once every run has ended, the redraw is the whole study."""
    loss = bowl({"adamw": (0.004, 0.1), "sgd_sai": (0.08, 0.0333)})
    args = ["--tune=adamw,sgd_sai", "--seeds=1,2", "--budget=12", "--set=device=cpu",
            f"--sweep_dir={tmp_path}"]
    assert sweep.main(args + ["--redraw=True"]) == 1
    assert "no run of the search" in capsys.readouterr().err
    cfg = sweep.SweepConfig(tune="adamw,sgd_sai", seeds="1,2", budget=12, set="device=cpu")
    made = []   # the whole study's runs, as a sweep would run them

    def start(run):
        made.append(run)
        return fake_start(loss)(run)
    sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path), start)
    os.remove(tmp_path / "tuned.json")   # that walk's: the redraws below write their own
    trials = {name: [run for run in made if run.setting["optimizer"] == name
                     and run.seed == cfg.tune_seed] for name in ("adamw", "sgd_sai")}
    ended = trials["adamw"][:10] + trials["sgd_sai"]     # adamw's 11th trial has not run
    for run in ended:
        ended_run(run, loss(run.setting, run.seed))
    assert sweep.main(args + ["--redraw=True"]) == 0
    table = (tmp_path / "trials.md").read_text()
    assert "Partial: 22 of the study's 28 runs have ended" in table
    assert not (tmp_path / "tune.md").exists() and not (tmp_path / "tuned.json").exists()
    assert sum(line.startswith("| adamw") for line in table.splitlines()) == 10
    assert sum(line.startswith("| sgd_sai") for line in table.splitlines()) == 12
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(run.run_dir) for run in ended]
        + ["best_lr_curves.png", "lr_sensitivity.png", "trials.csv", "trials.md"])
    for run in made:
        ended_run(run, loss(run.setting, run.seed))
    assert sweep.main(args + ["--redraw=True"]) == 0
    assert "Partial" not in (tmp_path / "trials.md").read_text()
    assert json.loads((tmp_path / "tuned.json").read_text()) == {
        "adamw": {"lr": "0.004", "weight_decay": "0.1"},
        "sgd_sai": {"lr": "0.08", "weight_decay": "0.0333"}}
    assert "| adamw | 12 | 0.004 | 0.1 |" in (tmp_path / "tune.md").read_text()


def test_a_stopped_trial_halts_the_search_instead_of_counting_as_diverged(tmp_path):
    """A trial stopped by Ctrl-C has no result yet: the search must not decide from it (as it
    would from a diverged one), and no other run starts; the same command resumes."""
    loss = bowl({"adamw": (0.004, 0.1)})
    seen = []

    def start(run):
        row = fake_row(loss, run)
        if len(seen) == 4:
            row["status"] = "stopped"
        seen.append(run)
        future = Future()
        future.set_result(row)
        return future
    cfg = sweep.SweepConfig(tune="adamw", seeds="1,2", budget=12)
    rows, report = sweep.tune(nanogpt_sai, cfg, ["--device=cpu"], str(tmp_path), start)
    assert report is None and len(seen) == len(rows) == 5   # one at a time: none after it
    assert [r["status"] for r in rows].count("stopped") == 1
