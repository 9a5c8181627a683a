"""app.runtime's cleanup of a local cluster's processes, on plain processes: an orphan
in a session of its own (as Ray's HAProxy is, once its proxy actor dies) is adopted and
stopped; what ran before the session is left alone. Each case runs in a child
interpreter, so that the test process never becomes a subreaper."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import psutil

SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    import psutil
    from app.runtime import adopt_orphans, stop_descendants

    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    adopt = sys.argv[1] == "adopt"
    before = adopt_orphans() if adopt else {older.pid}
    # A child that starts a grandchild in its own session, then dies: the grandchild is
    # an orphan, as HAProxy is when the raylet and its proxy actor are gone.
    spawn = "setsid sleep 60 >/dev/null 2>&1 & echo $!"
    parent = subprocess.Popen(["sh", "-c", spawn], stdout=subprocess.PIPE, text=True)
    orphan = int(parent.stdout.readline())
    parent.wait()
    time.sleep(0.2)
    stopped = stop_descendants(before, timeout_s=2)
    print(json.dumps({"older": older.pid, "orphan": orphan, "stopped": stopped,
                      "older_alive": older.poll() is None}))
    older.kill()
    """
)


def run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_orphan_of_the_session_is_adopted_and_stopped_and_older_children_are_kept() -> None:
    seen = run("adopt")
    assert seen["orphan"] in seen["stopped"]
    assert not alive(seen["orphan"])
    assert seen["older"] not in seen["stopped"] and seen["older_alive"]


def test_without_adoption_the_orphan_escapes() -> None:
    """What the adoption is for: without it the orphan belongs to init and survives."""
    seen = run("plain")
    try:
        assert seen["orphan"] not in seen["stopped"]
        assert alive(seen["orphan"])
    finally:
        if alive(seen["orphan"]):
            psutil.Process(seen["orphan"]).kill()
