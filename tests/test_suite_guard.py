"""The suite's own speed guard (conftest.py): a test over the per-test limit fails and says how to fix it, whether it
spends the time computing (CPU time over the limit) or waiting (wall time over 3x the limit); a test marked long with a
reason passes; a long mark without a reason fails. Run on a throw-away test file with a 1 s limit."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

CASES = '''
import time
import pytest

def spin(seconds):  # CPU time, not a sleep
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass

def test_quick():
    pass

def test_slow_unmarked():
    spin(1.3)

def test_waits_a_little():  # 1.3 s of wall time, no CPU: within 3x the limit
    time.sleep(1.3)

def test_waits_too_long():  # 3.3 s of wall time, no CPU: over 3x the limit
    time.sleep(3.3)

@pytest.mark.long(reason="spins on purpose")
def test_slow_marked():
    spin(1.3)

@pytest.mark.long
def test_marked_without_reason():
    pass

def test_slow_and_failing():
    spin(1.3)
    assert False, "its own failure"
'''


def test_the_speed_guard(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {**os.environ, "GREENRFM_TEST_LIMIT_S": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-n", "0", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout
    outcome = {ln.split("::")[1].split()[0]: ln.split()[0] for ln in out.splitlines() if ln.startswith(("PASSED", "FAILED"))}
    assert outcome == {"test_quick": "PASSED", "test_slow_unmarked": "FAILED", "test_waits_a_little": "PASSED",
                       "test_waits_too_long": "FAILED", "test_slow_marked": "PASSED",
                       "test_marked_without_reason": "FAILED", "test_slow_and_failing": "FAILED"}, out[-3000:]
    assert "over the suite's 1 s of CPU (3 s of wall time) per test" in out and "@pytest.mark.long(reason=...)" in out
    assert "needs reason=" in out
    assert "its own failure" in out  # a failing test keeps its own message, not the guard's
