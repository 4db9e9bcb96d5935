"""No test's result depends on the tests before it: conftest.py starts each from the same global
seeds and puts back what a test changed process-wide; --order runs the suite reversed or
shuffled to show it."""
import os
import re
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

LEAKY = textwrap.dedent("""
    import os
    import torch

    FIRST_DRAW = []

    def test_changes_the_process():
        FIRST_DRAW.append(torch.rand(()).item())
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True)
        os.environ["LEAKED"] = "1"
        os.chdir("/")
        torch.rand(5)

    def test_finds_it_as_it_was():
        assert torch.get_num_threads() == THREADS
        assert torch.get_default_dtype() == torch.float32
        assert not torch.are_deterministic_algorithms_enabled()
        assert "LEAKED" not in os.environ and os.getcwd() == DIRECTORY
        assert torch.rand(()).item() == FIRST_DRAW[0]      # the same seed at each test's start
    """)


def run_pytest(path, *options):
    env = dict(os.environ, PYTHONPATH=TESTS, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                           "no:cacheprovider", str(path), *options], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_what_a_test_changes_is_put_back_for_the_next(tmp_path):
    path = tmp_path / "test_leaky.py"
    path.write_text(LEAKY.replace("THREADS", "2").replace("DIRECTORY", repr(str(tmp_path))))
    done = run_pytest(path)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "2 passed" in done.stdout


def test_order_runs_the_tests_reversed_or_shuffled(tmp_path):
    path = tmp_path / "test_order.py"
    path.write_text("".join(f"def test_{i}():\n    print('ran {i}')\n" for i in range(6)))
    ran = {}
    for order in ("reversed", "7"):
        done = run_pytest(path, "-s", f"--order={order}")
        assert done.returncode == 0, done.stdout[-2000:]
        ran[order] = re.findall(r"ran (\d)", done.stdout)
    assert ran["reversed"] == list("543210")
    assert sorted(ran["7"]) == list("012345") and ran["7"] not in (list("012345"),
                                                                   ran["reversed"])
    done = run_pytest(path, "--order=backwards")
    assert done.returncode != 0 and "--order must be" in done.stderr
