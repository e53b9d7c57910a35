"""Shared test setup: offline Hugging Face, repo root on sys.path, paths to shared sample data, and the suite's speed
guard: a test (its setup included) that takes longer than LIMIT_S of CPU and of wall time, or WALL_FACTOR x LIMIT_S of
wall time, fails, unless it is marked @pytest.mark.long(reason="why it needs the time"). A suite that grows slow one test at a
time stops being run."""
import os
import resource
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real sample data lives beside the checkout (../shared), never inside the repository.
SAMPLE = ROOT.parent / "shared" / "greenrfm-sample-data"

# The suite runs in 2 pytest-xdist workers (pytest.ini), one test file per worker (--dist loadfile, so that a module's
# fixture, such as a trained encoder, is built once). Each worker computes on one thread: two workers of two threads
# each on a 2-core machine would make every torch kernel wait for a core. Run alone (-n 0), torch keeps its default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses too
    import torch
    torch.set_num_threads(1)

# Files that take longest run first, so that the two workers finish together (longest-first scheduling).
LONGEST_FIRST = ["test_faults.py", "test_gpu_check.py", "test_recipe.py", "test_trust.py", "test_stages.py", "test_distill.py",
                 "test_scan.py", "test_ablation_study.py"]

# Seconds one test may take, setup (its fixtures) included. GREENRFM_TEST_LIMIT_S raises it on a slower machine.
# Counted as the smaller of CPU time (this process and the subprocesses it waited for) and wall time: other work on a
# shared machine stretches wall time but not CPU time (on a busy host a 40 s test took 75 s), and a run with several
# threads (pytest -n 0) spends CPU time faster than wall time. A test that sleeps or waits uses no CPU: its wall time
# counts too, at WALL_FACTOR times the limit.
LIMIT_S = float(os.environ.get("GREENRFM_TEST_LIMIT_S", 60))
WALL_FACTOR = 3


def cpu_s():
    """CPU seconds of this process and its waited-for children, user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_configure(config):
    config.addinivalue_line("markers", "long(reason): this test may take longer than the suite's per-test limit; "
                                       "the reason says why it needs the time")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the others keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    t = cpu_s()
    yield
    item.setup_cpu = cpu_s() - t


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    t = cpu_s()
    yield
    item.call_cpu = cpu_s() - t


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """After setup, remember its time; after a passing call, fail the test if setup + call took over LIMIT_S of CPU and
    wall time both, or WALL_FACTOR x LIMIT_S of wall time, and it is not marked long (with a reason). A module-scoped fixture is charged
    to the first test that uses it."""
    rep = (yield).get_result()
    if call.when == "setup":
        item.setup_s = call.duration
        return
    if call.when != "call" or not rep.passed:
        return
    wall, mark = getattr(item, "setup_s", 0.0) + call.duration, item.get_closest_marker("long")
    cpu = getattr(item, "setup_cpu", 0.0) + getattr(item, "call_cpu", 0.0)
    if mark is not None and not mark.kwargs.get("reason"):
        rep.outcome, rep.longrepr = "failed", f"{item.nodeid}: @pytest.mark.long needs reason='why it needs the time'"
    elif mark is None and (min(cpu, wall) > LIMIT_S or wall > WALL_FACTOR * LIMIT_S):
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} took {cpu:.0f} s of CPU and {wall:.0f} s of wall time (setup and call), over the "
                        f"suite's {LIMIT_S:.0f} s of CPU ({WALL_FACTOR * LIMIT_S:.0f} s of wall time) per test: make it "
                        f"cheaper, or mark it @pytest.mark.long(reason=...)")


# -----------------------------------------------------------------------------
# A script's command line, run in this process: torch and transformers are imported once for the whole suite instead
# of once per run (2-6 s each on 2 cores). Use a subprocess only where the process itself is the subject: a kill, a
# crash, torchrun, a script that starts others, the environment a fresh process sees.

def run_script(name, *args, cwd, timeout=300):
    """`python <name> <args>` in this process, in folder cwd -> (exit code, stdout, stderr). An exception that escapes
    the script's own error handling (what a user would see as a traceback) propagates and fails the test."""
    import contextlib
    import io
    import runpy
    import signal

    def hung(*a):  # a script that loops instead of ending fails the test, not the CI run
        raise TimeoutError(f"{name} still running after {timeout} s")
    out, err, argv, here = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    signal.signal(signal.SIGALRM, hung)
    signal.alarm(timeout)
    try:
        os.chdir(cwd)
        sys.argv = [name, *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / name), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)  # SystemExit("message"): Python prints it and exits 1
    finally:
        signal.alarm(0)
        sys.argv = argv
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def script(tmp_path):
    """run_script in tmp_path: script("pretrain_vision.py", "--lite", ...) -> (exit code, stdout, stderr)."""
    return lambda name, *args: run_script(name, *args, cwd=tmp_path)


class Parsed(BaseException):
    """Raised by parse_only's stand-in for ArgumentParser.parse_args once the command line is parsed (a BaseException,
    so that no script's own error handling catches it)."""


def parse_only(name, *args, cwd):
    """`python <name> <args>` in this process, stopped as soon as the script has parsed its command line: nothing is
    read, built or trained. -> (exit code, the parser, the parsed namespace or None, stderr). An unknown flag or a
    missing required argument exits 2 with argparse's message, as it would for a user; a script that never parses a
    command line returns parser None."""
    import argparse
    real, seen = argparse.ArgumentParser.parse_args, {}

    def parse_and_stop(self, args=None, namespace=None):
        seen["parser"] = self
        seen["args"] = real(self, args, namespace)
        raise Parsed
    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        code, _, err = run_script(name, *args, cwd=cwd)
    except Parsed:
        return 0, seen["parser"], seen["args"], ""
    finally:
        argparse.ArgumentParser.parse_args = real
    return code, seen.get("parser"), None, err


def options(parser):
    """Every option string a parser and its subcommands accept (--no-x included for a BooleanOptionalAction)."""
    import argparse
    out = set()
    for a in parser._actions:
        out |= set(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= options(sub)
    return out
