"""run_lock: one process per run folder; a dead holder's lock is free at once (the kernel drops a flock)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from dfqbench import run_lock

_TRY = textwrap.dedent("""
    import sys
    from dfqbench import run_lock
    try:
        with run_lock.hold(sys.argv[1], "second"):
            print("acquired")
    except run_lock.RunInProgress as exc:
        print("busy:", exc)
""")
_HOLD_FOREVER = textwrap.dedent("""
    import sys, time
    from dfqbench import run_lock
    with run_lock.hold(sys.argv[1], "holder"):
        print("holding", flush=True)
        time.sleep(600)
""")


def _python(code, *args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env, **kwargs)


def test_a_held_folder_is_refused_to_another_process_and_free_after_release(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock.hold(run_dir, "python -m dfqbench method=rtn"):
        info = (run_dir / run_lock.LOCK_NAME).read_text()
        assert f'"pid": {os.getpid()}' in info
        out = _python(_TRY, run_dir).stdout
        assert out.startswith("busy:") and f"pid {os.getpid()} on " in out and "method=rtn" in out, out
        with pytest.raises(run_lock.RunInProgress):  # a second hold in the same process is refused too
            with run_lock.hold(run_dir):
                pass
    assert not (run_dir / run_lock.LOCK_NAME).exists()
    assert _python(_TRY, run_dir).stdout.strip() == "acquired"


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_FOREVER, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert _python(_TRY, run_dir).stdout.startswith("busy:")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run_dir / run_lock.LOCK_NAME).exists()  # left behind by the killed process, but not held
    assert _python(_TRY, run_dir).stdout.strip() == "acquired"
