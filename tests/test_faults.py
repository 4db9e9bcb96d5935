"""A walk through the faults a new user meets (damaged or foreign run directories, bad data
files, unwritable places, bad figures commands): each must end with exit status != 0, one line
on stderr starting 'error: ', no traceback, and every file of the runs already there unchanged."""
import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

import nanogpt_sai
import plots.__main__ as plots_cli
import vit_sai
from fake_data import write_corpus, write_fashion_mnist

GPT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
       "--eval_iters=2", "--max_iters=4", "--sample_tokens=0", "--device=cpu"]
VIT = ["--dim=16", "--depth=1", "--heads=2", "--batch_size=16", "--epochs=1", "--device=cpu",
       "--val_images=16"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished GPT run and one finished ViT run, with their data; copied per test."""
    root = tmp_path_factory.mktemp("finished")
    corpus = write_corpus(root / "input.txt")
    write_fashion_mnist(root / "fmnist", n_train=64, n_test=32)
    assert nanogpt_sai.main(GPT + [f"--data_path={corpus}", f"--data_dir={root / 'cache'}",
                                   f"--out_dir={root / 'gpt'}"]) == 0
    assert vit_sai.main(VIT + [f"--data_path={root / 'fmnist'}", f"--data_dir={root / 'cache'}",
                               f"--out_dir={root / 'vit'}"]) == 0
    return root


def truncate(path, keep):
    with open(path, "rb") as f:
        head = f.read()[:keep(os.path.getsize(path))]
    with open(path, "wb") as f:
        f.write(head)


def edit_json(path, **changes):
    with open(path) as f:
        content = json.load(f)
    with open(path, "w") as f:
        json.dump(content | changes, f)


def damage_second_line(path):
    with open(path) as f:
        lines = f.readlines()
    lines[1] = "{not json\n"
    with open(path, "w") as f:
        f.writelines(lines)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def other_text(root):   # the run's data file, as if replaced by another text since the save
    write_bytes(root / "other.txt", ("0123456789 ,.;:!?\n" * 2000).encode())
    edit_json(root / "gpt" / "config.json", data_path=str(root / "other.txt"))


def offline_now(root):   # a tiny shakespeare run resumed offline: the manual would replace it
    edit_json(root / "gpt" / "config.json", data_path="", data_dir=str(root / "offline_cache"))
    edit_json(root / "gpt" / "run.json", data_source="tinyshakespeare")


def other_images(root):
    write_fashion_mnist(root / "other", n_train=48, n_test=32)
    edit_json(root / "vit" / "config.json", data_path=str(root / "other"))


# (name, how to break things under the copied root, command, arguments, the error's words)
FAULTS = [
    ("missing checkpoint", lambda r: os.remove(r / "gpt" / "ckpt.pt"),
     nanogpt_sai.main, ["--resume={gpt}"], "no ckpt.pt there"),
    ("empty checkpoint", lambda r: truncate(r / "gpt" / "ckpt.pt", lambda n: 0),
     nanogpt_sai.main, ["--resume={gpt}"], "ckpt.pt cannot be read"),
    ("truncated checkpoint", lambda r: truncate(r / "gpt" / "ckpt.pt", lambda n: n // 2),
     nanogpt_sai.main, ["--resume={gpt}"], "ckpt.pt cannot be read"),
    ("damaged metrics log", lambda r: damage_second_line(r / "gpt" / "metrics.jsonl"),
     nanogpt_sai.main, ["--resume={gpt}"], "metrics.jsonl: line 2 is not JSON"),
    ("damaged config", lambda r: write_bytes(r / "gpt" / "config.json", b"{"),
     nanogpt_sai.main, ["--resume={gpt}"], "its config.json is damaged"),
    ("other trainer's run", lambda r: None,
     nanogpt_sai.main, ["--resume={vit}"], "another trainer's run"),
    ("model changed since the save", lambda r: edit_json(r / "gpt" / "config.json", n_embd=32),
     nanogpt_sai.main, ["--resume={gpt}"], "the checkpoint's model is not this model"),
    ("data changed since the save", other_text,
     nanogpt_sai.main, ["--resume={gpt}"], "the run trained on vocab_size"),
    ("offline fallback instead of the data", offline_now,
     nanogpt_sai.main, ["--resume={gpt}"], "the run trained on data_source 'tinyshakespeare', "
                                          "and here it is 'pydoc_topics'"),
    ("image data changed since the save", other_images, vit_sai.main, ["--resume={vit}"],
     "the run trained on n_train 48, and here it is 32"),   # after the 16 held out
    ("out_dir is a file", lambda r: write_bytes(r / "file", b"x"),
     nanogpt_sai.main, GPT + ["--data_path={root}/input.txt", "--out_dir={root}/file"],
     "is a file; give a directory"),
    ("out_dir cannot be made", lambda r: write_bytes(r / "file", b"x"),
     vit_sai.main, VIT + ["--data_path={root}/fmnist", "--out_dir={root}/file/run"],
     "cannot be written"),
    ("out_dir holds a finished run", lambda r: None,
     nanogpt_sai.main, GPT + ["--data_path={root}/input.txt", "--out_dir={gpt}"],
     "already holds a run; resume it with --resume="),
    ("data_path is a directory", lambda r: None,
     nanogpt_sai.main, GPT + ["--data_path={root}", "--out_dir={root}/new"], "is a directory"),
    ("data_path not UTF-8", lambda r: write_bytes(r / "latin1.txt", "café".encode("latin-1") * 9),
     nanogpt_sai.main, GPT + ["--data_path={root}/latin1.txt", "--out_dir={root}/new"],
     "the text is not UTF-8"),
    ("data_path too short", lambda r: write_bytes(r / "short.txt", b"0123456789"),
     nanogpt_sai.main, GPT + ["--data_path={root}/short.txt", "--out_dir={root}/new"],
     "is too short (10 characters)"),
    ("data_path empty", lambda r: write_bytes(r / "empty.txt", b""),
     nanogpt_sai.main, GPT + ["--data_path={root}/empty.txt", "--out_dir={root}/new"],
     "is empty"),
    ("data_dir cannot be written", lambda r: write_bytes(r / "file", b"x"),
     nanogpt_sai.main, GPT + ["--data_path={root}/input.txt", "--data_dir={root}/file/cache",
                              "--out_dir={root}/new"], "--data_dir="),
    ("negative sample length", lambda r: None,
     nanogpt_sai.main, GPT + ["--sample_tokens=-1"], "--sample_tokens must be >= 0"),
    ("figures of a missing directory", lambda r: None,
     plots_cli.main, ["{root}/nothing"], "is not a directory"),
    ("figures of a damaged log", lambda r: damage_second_line(r / "gpt" / "metrics.jsonl"),
     plots_cli.main, ["{gpt}"], "metrics.jsonl: line 2 is not JSON"),
    ("figures of both trainers' runs", lambda r: None,
     plots_cli.main, ["{gpt}", "{vit}"], "runs of both trainers"),
    ("figures with a bad option", lambda r: None,
     plots_cli.main, ["{gpt}", "--output=x"], "unknown option --output=x"),
]


@pytest.mark.parametrize("name,breakage,command,args,words", FAULTS,
                         ids=[fault[0] for fault in FAULTS])
def test_fault_gets_a_one_line_error_and_loses_nothing(name, breakage, command, args, words,
                                                       finished, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in these tests")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "root"
    shutil.copytree(finished, root)
    breakage(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    argv = [a.format(root=root, gpt=root / "gpt", vit=root / "vit") for a in args]
    if command is not plots_cli.main and not any(a.startswith(("--data_dir", "--resume"))
                                                 for a in argv):
        argv.append(f"--data_dir={root / 'cache'}")
    assert command(argv) not in (0, None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"{name} changed {changed}"


def test_a_run_aborted_before_its_first_checkpoint_starts_over(finished, tmp_path, capsys):
    """A double Ctrl-C during the first evaluation leaves a log but no checkpoint: --resume
    says so, and the same --out_dir then starts the run over."""
    root = tmp_path / "root"
    shutil.copytree(finished, root)
    os.remove(root / "gpt" / "ckpt.pt")
    with open(root / "gpt" / "metrics.jsonl", "w"):
        pass
    data = [f"--data_path={root / 'input.txt'}", f"--data_dir={root / 'cache'}"]
    assert nanogpt_sai.main([f"--resume={root / 'gpt'}"]) == 2
    assert f"start it again with --out_dir={root / 'gpt'}" in capsys.readouterr().err
    assert nanogpt_sai.main(GPT + data + [f"--out_dir={root / 'gpt'}"]) == 0
    assert "aborted before its first checkpoint; starting it over" in capsys.readouterr().out
