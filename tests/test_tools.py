"""tools/: ms_per_iter.py reads ms/iter between log lines from step 100 on, from nanoGPT's
stamped stdout and from a nanogpt_sai.py metrics log alike; partition_figure.py draws the baby
GPT's Adam-mini blocks."""
import importlib.util
import json
import os

from run_helpers import is_png


def tool(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms_per_iter = tool("ms_per_iter")


def test_ms_per_iter_reads_both_logs(tmp_path, capsys):
    nanogpt = tmp_path / "nanogpt.txt"
    nanogpt.write_text("1000.000 step 0: train loss 4.2\n1000.500 iter 0: loss 4.2, time 9ms\n"
                       "1002.000 iter 100: loss 2.4\n1003.500 iter 200: loss 2.2\n"
                       "1006.500 iter 300: loss 2.1\n")
    ours = tmp_path / "metrics.jsonl"
    ours.write_text("\n".join(json.dumps(r) for r in [
        dict(event="eval", step=0, wall_s=0.5), dict(event="train", step=50, wall_s=1.0),
        dict(event="train", step=100, wall_s=2.0), dict(event="train", step=150, wall_s=3.0),
        dict(event="train", step=200, wall_s=3.5)]) + "\n")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps(dict(event="train", step=100, wall_s=2.0)) + "\n")
    assert ms_per_iter.main(["nanoGPT", str(nanogpt), "ours", str(ours), "short",
                             str(short)]) == 0
    # intervals: nanoGPT 15 and 30 ms; ours 20 and 10 ms (step 50 is before step 100)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| nanoGPT | 22.50 | 15.00-30.00 | 2 x 100 |"
    assert lines[3] == "| ours | 15.00 | 10.00-20.00 | 2 x 50 |"
    assert lines[4].startswith("| short | no two log lines from step 100 on")
    assert ms_per_iter.main(["only a label"]).startswith("python tools/ms_per_iter.py")


def test_partition_figure_draws_the_baby_gpts_blocks(tmp_path, capsys):
    partition_figure = tool("partition_figure")
    assert partition_figure.main([f"--out={tmp_path}"]) == 0
    assert is_png(tmp_path / "adam_mini_partition.png")
    assert partition_figure.main(["--output=x"]) == 2
    assert capsys.readouterr().err == "error: unknown argument --output=x (the one option is " \
                                      "--out=DIR)\n"
