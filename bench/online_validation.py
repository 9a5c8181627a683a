"""Online request validation: pandera vs the compiled contract, same rules, same run.

The ingress checks every request against the workload's contract. pandera is the engine
for batches offline; per request its fixed cost dominates. This measures both on the
same rows so the choice rests on a number, not a guess.

    .venv/bin/python -m bench.online_validation
    .venv/bin/python -m bench.online_validation --quick    # what make test runs: 0.1 s each
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import numpy as np
import pandas as pd

from app.workloads import get_workload
from data.validate import check_rows
from serve_graphs.api.contract import CompiledContract, RecordFastPath

REPEATS_S = 2.0  # time budget per measurement


def per_call_ms(fn, *args, budget_s: float = REPEATS_S) -> float:  # noqa: ANN001
    fn(*args)  # warm up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        fn(*args)
        calls += 1
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.1 s per measurement")
    budget_s = 0.1 if parser.parse_args().quick else REPEATS_S
    workload = get_workload("digits")
    contract = workload.instance_contract()
    compiled = CompiledContract(contract)
    columns = list(workload.feature_columns)
    rng = np.random.default_rng(0)
    rows = [
        f"| {'rows':>5} | {'pandera ms':>10} | {'compiled ms':>11} | {'speed-up':>8} |",
        "|------:|-----------:|------------:|---------:|",
    ]
    for n in (1, 16, 64, 1024):
        values = rng.integers(0, 17, (n, len(columns))).astype(float)

        def with_pandera(v: np.ndarray) -> None:
            check_rows(pd.DataFrame(v, columns=columns), contract, where="request")

        slow = per_call_ms(with_pandera, values, budget_s=budget_s)
        fast = per_call_ms(compiled.row_errors, values, budget_s=budget_s)
        rows.append(f"| {n:>5} | {slow:>10.3f} | {fast:>11.3f} | {slow / fast:>7.1f}x |")
    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    print(f"online validation, digits contract (64 columns), {date.today()}, {machine}")
    print("\n".join(rows))
    print()
    print(f"online validation, transactions records (6 fields), {date.today()}, {machine}")
    print("\n".join(records_rows(budget_s)))


def records_rows(budget_s: float) -> list[str]:
    """Valid records, as a request carries them (times as ISO-8601 text): pandera vs the
    fast path, which runs pandera's own checks on columns it coerced itself."""
    workload = get_workload("transactions")
    contract = workload.instance_contract()
    fast_path = RecordFastPath(contract)
    source = workload.builtin_source()[list(workload.feature_columns)]
    source = source.assign(ts=source["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    rows = [
        f"| {'rows':>5} | {'pandera ms':>10} | {'fast path ms':>12} | {'speed-up':>8} |",
        "|------:|-----------:|-------------:|---------:|",
    ]
    for n in (1, 16, 64, 1024):
        frame = source.head(n).reset_index(drop=True)
        assert fast_path(frame) is not None, "valid records must take the fast path"
        slow = per_call_ms(
            lambda f: check_rows(f, contract, where="request"), frame, budget_s=budget_s
        )
        fast = per_call_ms(fast_path, frame, budget_s=budget_s)
        rows.append(f"| {n:>5} | {slow:>10.3f} | {fast:>12.3f} | {slow / fast:>7.1f}x |")
    return rows


if __name__ == "__main__":
    main()
