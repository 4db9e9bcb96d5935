"""vit_sai.py through its command line: shapes, partition, runs, exact resume, data, errors."""
import json

import pytest
import torch

import data.images
import optim
import vit_sai
from fake_data import write_cifar10, write_fashion_mnist
from run_helpers import ctrl_c_after_step, is_png, records

TINY = ["--dim=16", "--depth=1", "--heads=2", "--mlp_ratio=2", "--batch_size=16", "--val_images=16",
        "--warmup_iters=2", "--log_interval=2", "--device=cpu"]


@pytest.fixture
def fmnist(tmp_path):
    """A 64 + 32 image Fashion-MNIST in the real file format, and an empty cache."""
    write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=32)
    return [f"--data_path={tmp_path / 'fmnist'}", f"--data_dir={tmp_path / 'cache'}"]


def test_model_output_shapes():
    cfg = vit_sai.Config(patch_size=4, dim=32, depth=2, heads=4)
    for channels, size in ((1, 28), (3, 32)):
        model = vit_sai.ViT(cfg, image_size=size, channels=channels, num_classes=10)
        assert model(torch.randn(5, channels, size, size)).shape == (5, 10)
        assert model.pos_embedding.weight.shape == ((size // 4) ** 2 + 1, 32)
    mean_pool = vit_sai.ViT(vit_sai.Config(pool="mean", dim=32, heads=4), 28, 1, 7)
    assert mean_pool(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_adam_mini_partition_of_the_vit():
    cfg = vit_sai.Config(patch_size=4, dim=32, depth=1, heads=4, mlp_ratio=2)
    model = vit_sai.ViT(cfg, image_size=28, channels=1, num_classes=10)
    assert len(optim.param_kinds(model)) == len(list(model.parameters()))   # every one named
    rules = optim.block_rules(model)
    attn, ff = model.layers[0]
    assert rules[attn.to_qkv.weight] == ("qkv", 4)                 # Q, K per head; V per row
    assert rules[attn.to_out.weight] == "rows" and rules[attn.to_out.bias] == "full"
    assert rules[ff.net[1].weight] == rules[ff.net[4].weight] == "rows"
    assert rules[model.to_patch_embedding[2].weight] == "rows"     # per neuron
    assert rules[model.mlp_head.weight] == "rows"                  # per class
    assert rules[model.cls_token.weight] == rules[model.pos_embedding.weight] == "tensor"
    assert rules[model.norm.weight] == "tensor" and rules[model.norm.bias] == "full"
    blocks = {p: sum(n for n, _ in optim.block_layout(r, tuple(p.shape))) for p, r in rules.items()}
    assert blocks[attn.to_qkv.weight] == 4 + 4 + 32 and blocks[model.mlp_head.weight] == 10


@pytest.mark.parametrize("optimizer", sorted(optim.OPTIMIZERS))
def test_few_iterations_of_each_optimizer(optimizer, fmnist, tmp_path):
    out = tmp_path / "run"
    assert vit_sai.main(TINY + fmnist + [f"--optimizer={optimizer}", "--epochs=2",
                                         f"--out_dir={out}"]) == 0
    recs = records(out)
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and recs[-1]["status"] == "finished"
    for r in evals:              # each epoch on the 16 held-out training images
        assert 0 <= r["val_acc"] <= 1 and r["samples"] == r["step"] * 16
        assert set(r) >= {"val_loss", "train_loss", "state_bytes", "param_bytes", "grad_bytes",
                          "peak_bytes", "train_s", "best_val_acc"}
        assert "test_acc" not in r and torch.tensor(r["confusion"]).sum() == 16
    assert [r["step"] for r in recs if r["event"] == "train"] == [2, 4, 6]   # 48 images: 3 steps
    test = [r for r in recs if r["event"] == "test"]   # the test set once, after the last step
    assert [r["step"] for r in test] == [6]
    confusion = torch.tensor(test[0]["confusion"])     # rows: the 32 test images by true class
    assert confusion.shape == (10, 10) and confusion.sum() == 32
    assert confusion.trace() / 32 == pytest.approx(test[0]["test_acc"])
    for name in ("loss.png", "memory.png", "accuracy.png", "confusion.png"):
        assert is_png(out / name)


@pytest.mark.parametrize("stop_after", [5, 6])
def test_resume_is_exact(fmnist, tmp_path, monkeypatch, stop_after):
    """Ctrl-C mid-epoch (step 5) or at an epoch's last step (6: its evaluation comes after the
    resume, not lost), resume: losses and accuracies equal the uninterrupted run's (dropout
    on, reshuffled epochs: RNG, shuffle order and position must all come back)."""
    common = TINY + fmnist + ["--epochs=3", "--log_interval=1", "--dropout=0.1",
                              "--optimizer=adam_mini"]
    assert vit_sai.main(common + [f"--out_dir={tmp_path / 'straight'}"]) == 0
    ctrl_c_after_step(monkeypatch, stop_after)   # 3 steps per epoch
    stopped = tmp_path / "stopped"
    assert vit_sai.main(common + [f"--out_dir={stopped}"]) == 130
    monkeypatch.undo()
    assert vit_sai.main([f"--resume={stopped}"]) == 0

    def curve(run_dir):
        return [(r["event"], r["step"], r.get("loss"), r.get("val_acc"), r.get("val_loss"))
                for r in records(run_dir) if r["event"] != "end"]
    assert curve(stopped) == curve(tmp_path / "straight")


def test_cifar10_runs_with_augmentation(tmp_path):
    write_cifar10(tmp_path / "cifar-10-python.tar.gz", per_batch=8)
    out = tmp_path / "run"
    assert vit_sai.main(TINY + [f"--data_path={tmp_path}", f"--data_dir={tmp_path / 'cache'}",
                                "--dataset=cifar10", "--epochs=1", "--batch_size=8",
                                "--patch_size=8", f"--out_dir={out}"]) == 0
    with open(out / "run.json") as f:
        run = json.load(f)
    assert (run["data_source"], run["n_train"], run["n_val"], run["n_test"]) == (
        "cifar10", 40 - 16, 16, 8)


def test_offline_falls_back_to_rendered_digits(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise data.images.DownloadError("no network in this test")
    monkeypatch.setattr(data.images, "download", offline)
    monkeypatch.setattr(data.images, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data.images, "DIGITS_TRAIN", 64)
    monkeypatch.setattr(data.images, "DIGITS_TEST", 32)
    out = tmp_path / "run"
    assert vit_sai.main(TINY + [f"--data_dir={tmp_path / 'cache'}", "--max_iters=2",
                                f"--out_dir={out}"]) == 0
    with open(out / "run.json") as f:
        assert json.load(f)["data_source"] == "digits"
    assert "rendered-digits fallback" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--dim=30", "--heads=4"], "--dim=30 must be divisible by --heads=4"),
    (["--patch_size=5"], "--patch_size=5 must divide the image side 28"),
    (["--dataset=mnist"], "--dataset must be fashion_mnist, cifar10 or digits"),
    (["--pool=max"], "--pool must be cls or mean"),
    (["--epochs=0"], "--epochs must be > 0"),
    (["--weight_decay=-1"], "--weight_decay must be >= 0, got -1"),   # the GPT's sentinel only
    (["--label_smoothing=1.5"], "--label_smoothing must be in [0, 1)"),
    (["--optimizer=sgd"], "unknown optimizer 'sgd'"),
    (["--depth=2.5"], "--depth expects int, got '2.5'"),
    (["--data_path=/nonexistent"], "--data_path: data_path '/nonexistent' lacks"),
])
def test_bad_command_line_gets_a_one_line_error(args, message, fmnist, tmp_path, capsys):
    argv = TINY + [a for a in fmnist if not a.startswith("--data_path") or
                   not args[0].startswith("--data_path")] + args
    assert vit_sai.main(argv + [f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
