"""The figures a teacher projects: every title, label and legend lies inside the canvas for the
longest titles the trainers write (an offline fallback's, a long run, a variant's label), and
a sweep's runs are one line per setting, mean over its seeds, labelled in full."""
import json

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba

from plots import figures, studies
from plots.figures import draw_all


def write_run(path, config, info, records):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "run.json").write_text(json.dumps(info))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


MEMORY = dict(param_bytes=3_216_384, grad_bytes=3_216_384, peak_bytes=424_488_960,
              peak_kind="cpu_peak_rss")


BLOCKS = [f"transformer.h.{i}.{part}" for i in range(4) for part in
          ("ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight",
           "mlp.c_fc.weight", "mlp.c_proj.weight")]


def diagnostics(step):
    return {name: dict(gsnr=3.0 + i, gsnr_identity=3.0 + i, gsnr_per_sqrt_n=1 + i / 10,
                       example_snr=0.1 * (i + 1) + step / 1e6, noise_scale=12.0,
                       sai_scale=3.0 + i) for i, name in enumerate(BLOCKS)}


def gpt_run(root, optimizer="sgd_sai", lr=0.02, seed=1337, weight_decay=0.1, **config):
    """A GPT run on the offline fallback (the longest data name), a million steps long, with
    --diagnostics' per-block statistics at each evaluation."""
    config = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay, seed=seed,
                  sai_rule="gsnr_max", sign_placement="mean_of_signs",
                  preconditioner="second_moment", dataset="shakespeare_char", n_layer=4,
                  max_iters=1_000_000, batch_size=12, block_size=64, grad_accum=1,
                  out_dir=str(root), **config)
    info = dict(n_params=804_096, n_params_non_embedding=787_584, data_source="pydoc_topics")
    state = 2 * MEMORY["param_bytes"] if optimizer == "adamw" else MEMORY["param_bytes"]
    records = [dict(event="train", step=s, loss=3 - s / 1e6 - seed / 1e5, train_s=s / 1e4,
                    state_bytes=state, **MEMORY) for s in range(0, 1_000_001, 250_000)]
    records += [dict(event="eval", step=s, val_loss=3.1 - s / 1e6 - seed / 1e4,
                     train_s=s / 1e4, state_bytes=state, diagnostics=diagnostics(s),
                     noise_scale=40.0 + s / 1e5, **MEMORY)
                for s in range(0, 1_000_001, 500_000)]
    name = f"{optimizer}-lr{lr}-wd{weight_decay}-seed{seed}"
    return write_run(root / name, config, info, records + [dict(event="end", step=1_000_000,
                                                                status="finished")])


def vit_run(root):
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    config = dict(optimizer="sgd_sai", lr=0.04, weight_decay=0.15, seed=1337,
                  sai_rule="gsnr_max", patch_size=4, dataset="fashion_mnist", max_iters=0,
                  epochs=300, batch_size=128)
    info = dict(n_params=138_410, n_params_non_embedding=134_122, data_source="digits",
                n_train=60_000, classes=classes)
    confusion = [[90 if i == j else 1 for j in range(10)] for i in range(10)]
    records = [dict(event="eval", step=s, epoch=s / 469, test_loss=1 - s / 2e5,
                    test_acc=0.5 + s / 3e5, train_s=s / 10, confusion=confusion,
                    state_bytes=553_640, **MEMORY) for s in range(0, 140_701, 46_900)]
    return write_run(root / "vit", config, info, records)


@pytest.fixture
def drawn(monkeypatch):
    """The figures draw_all makes, kept open (laid out and saved) for inspection."""
    kept, close = [], plt.close
    monkeypatch.setattr(figures.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def outside(fig):
    """The texts of `fig` that reach beyond its canvas (a pixel's grace), as drawn on screen,
    and the level tick labels that run into their neighbours (slanted ones are meant to)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = figures.figure_texts(fig)
    texts += [t for leg in fig.legends + [ax.get_legend() for ax in fig.axes] if leg
              for t in leg.get_texts() + [leg.get_title()]]
    out = []
    for text in texts:
        box = text.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > fig.bbox.width + 1 or \
                box.y1 > fig.bbox.height + 1:
            out.append(text.get_text())
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticklabels() if t.get_text() and not t.get_rotation()]
        boxes = [t.get_window_extent(renderer) for t in ticks]
        out += [f"{a.get_text()} | {b.get_text()}" for a, b, box_a, box_b in
                zip(ticks, ticks[1:], boxes, boxes[1:]) if box_a.x1 > box_b.x0 + 1]
    return out


def test_a_runs_figures_show_their_whole_titles(tmp_path, drawn):
    paths = draw_all([gpt_run(tmp_path)], str(tmp_path / "one"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "memory.png", "diagnostics.png"]
    title = drawn[0]._suptitle.get_text()
    assert "offline fallback: not tiny shakespeare" in title and "1,000,000 steps" in title
    for fig in drawn:
        assert outside(fig) == []


def test_a_compare_runs_figures_show_their_whole_titles(tmp_path, drawn):
    """All seven at their default lr and weight decay: the settings differ in both."""
    runs = [gpt_run(tmp_path, name, lr, weight_decay=wd) for name, lr, wd in
            [("adamw", 0.004, 0.1), ("sgd_sai", 0.02, 0.0111), ("adam_mini", 0.004, 0.1),
             ("apollo", 0.064, 0.0333), ("apollo_mini", 0.008, 0.0111), ("muon", 0.004, 0.1),
             ("adafactor", 0.04, 0.000412)]]
    draw_all(runs, str(tmp_path / "compare"))
    for fig in drawn:
        assert outside(fig) == []


def test_a_vit_runs_figures_show_their_whole_titles(tmp_path, drawn):
    paths = draw_all([vit_run(tmp_path)], str(tmp_path / "vit"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "memory.png", "accuracy.png",
                                                    "confusion.png"]
    for fig in drawn:
        assert outside(fig) == []


def test_a_sweeps_runs_are_one_line_per_setting(tmp_path, drawn):
    """12 runs: 2 optimizers x 2 weight decays x 3 seeds. One line each of the 4 settings, the
    mean over its seeds, labelled with every option that differs, in 4 colours."""
    runs = [gpt_run(tmp_path, name, 1e-3, seed, wd) for name in ("adamw", "sgd_sai")
            for wd in (0.0, 0.1) for seed in (1, 2, 3)]
    draw_all(runs, str(tmp_path / "sweep"))
    loss = drawn[0]
    handles, labels = loss.axes[0].get_legend_handles_labels()
    assert len(labels) == len(set(labels)) == 4
    assert all(" wd=" in label and "3 seeds" in label for label in labels)
    assert len({to_rgba(h.get_color()) for h in handles}) == 4
    mean_of_seeds = 3.1 - 1.0 - 2 / 1e4                      # the last evaluation, seeds 1..3
    assert labels[0].endswith(f"val {mean_of_seeds:.3f}")
    assert len(loss.axes[0].collections) == 4                # a band per setting
    assert "band: range over seeds" in loss.axes[0].get_legend().get_title().get_text()
    assert outside(loss) == []


def test_many_settings_get_as_many_colours():
    for n in (3, 10, 11, 20, 27):
        assert len({to_rgba(c) for c in figures.colors(n)}) == n


def test_a_vit_sweeps_lr_figure_names_the_test_loss(tmp_path, drawn, monkeypatch):
    rows = [dict(setting={"optimizer": "sgd_sai", "lr": lr}, seed=1, status="finished",
                 final_test_loss=1.0 - float(lr), final_test_acc=0.8,
                 run_dir=str(tmp_path / "none"))
            for lr in ("0.01", "0.02")]
    monkeypatch.setattr(studies, "save_figure", lambda fig, path, note: drawn.append(fig))
    studies.lr_sensitivity(rows, str(tmp_path / "lr.png"))
    assert drawn[0].axes[0].get_ylabel() == "final test loss"
    rows = [dict(row, final_val_loss=row.pop("final_test_loss")) for row in rows]
    studies.lr_sensitivity(rows, str(tmp_path / "lr.png"))
    assert drawn[1].axes[0].get_ylabel() == "final validation loss"


def test_a_sweeps_study_figures_show_their_whole_titles(tmp_path, drawn):
    """lr_sensitivity and best_lr_curves, under the context line of the longest regime."""
    rows = []
    for name in ("adamw", "sgd_sai"):
        for lr in (0.001, 0.01):
            for seed in (1, 2):
                run_dir = gpt_run(tmp_path, name, lr, seed)
                rows.append(dict(setting={"optimizer": name, "lr": str(lr)}, seed=seed,
                                 status="finished", final_val_loss=2.0 + lr - seed / 1e4,
                                 run_dir=run_dir))
    studies.lr_sensitivity(rows, str(tmp_path / "lr.png"))
    studies.best_lr_curves(rows, str(tmp_path / "best.png"))
    assert len(drawn) == 2 and "offline fallback" in drawn[0]._suptitle.get_text()
    # a redraw of a study stopped part way says so under each figure's title
    partial = "Partial: 8 of the sweep's 12 runs have ended"
    assert studies.draw("lr", rows, str(tmp_path), note=partial) == [
        str(tmp_path / "lr_sensitivity.png"), str(tmp_path / "best_lr_curves.png")]
    assert len(drawn) == 4
    for fig in drawn[2:]:
        title = fig._suptitle.get_text()
        assert "offline fallback" in title and title.replace("\n", " ").endswith(partial)
    for fig in drawn:
        assert outside(fig) == []
