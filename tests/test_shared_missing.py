"""tests/conftest.py without ../shared: one skip reason for every test that needs it, exit status 1 under CI=true."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = '''
def test_needs_the_data(cifar10_root):
    assert cifar10_root.is_dir()


def test_needs_the_teacher(teacher):
    assert teacher.is_file()


def test_needs_nothing():
    assert True
'''


def _pytest(folder: Path, empty: Path, *args: str, ci: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(DFQ_CIFAR10_ROOT=str(empty), DFQ_MODELS_DIR=str(empty), DFQ_IMAGENET_SAMPLES=str(empty))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def tiny_suite(tmp_path):
    folder, empty = tmp_path / "suite", tmp_path / "empty"
    folder.mkdir()
    empty.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), folder / "conftest.py")  # the real hooks and fixtures
    (folder / "test_tiny.py").write_text(TINY)
    return folder, empty


def test_without_ci_the_tests_that_need_shared_skip_with_one_reason_reported_once(tiny_suite):
    proc = _pytest(*tiny_suite)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 2 skipped" in out
    assert out.count("../shared not found") == 1, out  # one summary line, not one per test
    assert "2 tests skipped: ../shared not found: no CIFAR-10 test images at" in out and "DFQ_MODELS_DIR" in out
    listed = _pytest(*tiny_suite, "-rs")
    reasons = {line.split(": ", 1)[1] for line in listed.stdout.splitlines() if line.startswith("SKIPPED")}
    assert len(reasons) == 1, listed.stdout  # the same reason for both


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_missing_shared_fails_the_run(tiny_suite, ci):
    proc = _pytest(*tiny_suite, ci=ci)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "CI=true and 2 selected tests need what is missing, ../shared not found" in out
    assert "passed" not in out and "skipped" not in out


def test_under_ci_tests_that_need_nothing_still_run(tiny_suite):
    proc = _pytest(*tiny_suite, "-k", "needs_nothing", ci="true")
    assert proc.returncode == 0 and "1 passed, 2 deselected" in proc.stdout, proc.stdout + proc.stderr
