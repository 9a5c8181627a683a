"""Every benchmark's ``--quick`` mode, as a user runs it: so a refactor cannot leave one broken.

Each runs as ``python -m bench.<name> --quick`` from the repository root and must exit 0
and print its table. The serving benchmarks share one store with a calibrated cascade,
trained once (1 epoch) for the module; those with PASS/FAIL checks run ``--report-only``,
since the timings of a shared machine are no verdict (the committed tables are).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.system.conftest import REPO, clean_env

pytestmark = pytest.mark.slow


def run_bench(*args: str) -> str:
    """``python -m <args>`` in the repository root; its stdout, once it exited 0."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=clean_env(RAY_AUTH_MODE="token"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def store(trained_store: Path) -> Path:
    """Both tiers trained for 1 epoch and a promoted cascade: the system tier's shared
    store (tests/system/conftest.py), trained once for every test that serves."""
    return trained_store


# The header line of each table a benchmark prints (train_gpu: its skip line without CUDA).
TABLES = {
    "data_pipeline": r"^\| rows \| input MB \| engine \| seconds \| rows/s \| vs pool \| peak RSS",
    "read_split": r"^\| dataset \| split \| files \| rows \| reader \| seconds \|",
    "online_validation": r"^\|\s+rows \| pandera ms \| fast path ms \| speed-up \|$",
    "train": r"^\| mb\s+\| setup\s+\| cores \| samples/s \|"  # and then its fixed costs:
    r"(?s:.*)^\| setup\s+\| run s \| steps s \|",
    "train_gpu": r"^(no CUDA device: skipped|\| batch \| samples/s)",
    "train_memory": r"^\| rows in \| train rows \| feed \|"  # and a run that streamed:
    r"(?s:.*)^\| 20,000 \| [\d,]+ \| streamed \|",
}


@pytest.mark.parametrize("name", TABLES)
def test_quick_mode_prints_its_table(name: str) -> None:
    out = run_bench(f"bench.{name}", "--quick")
    assert re.search(TABLES[name], out, re.MULTILINE), out[-3000:]


def test_serve_quick_measures_each_setup(store: Path) -> None:
    out = run_bench("bench.serve", "--quick", "--store", str(store), "--port", str(free_port()))
    assert "| setup | concurrency | req/s | p50 ms | p99 ms | errors |" in out, out[-3000:]
    setups = ["a", "b", "d", "e"]  # --quick: the stock cluster only
    if importlib.util.find_spec("litserve") is not None:  # the bench extra, not the test one
        setups.append("c")
    for setup in setups:
        assert re.search(rf"^\| {re.escape(setup)} .* \| 16 \| ", out, re.MULTILINE), out[-3000:]


CHECKED = {
    "overload": "| run | connections | req/s | 200 share | 503+429 share |",
    "live_stats": "| run | ops.live_stats | req/s at 64 | p99 ms | errors |",
}


@pytest.mark.parametrize("name", CHECKED)
def test_quick_mode_reports_its_checks(store: Path, name: str) -> None:
    out = run_bench(
        f"bench.{name}", "--quick", "--report-only", "--store", str(store),
        "--port", str(free_port()),
    )  # fmt: skip
    assert CHECKED[name] in out, out[-3000:]
    assert re.search(r"^(PASS|FAIL) ", out, re.MULTILINE), out[-3000:]
