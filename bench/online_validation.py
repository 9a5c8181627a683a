"""Online request validation: pandera vs the compiled contract, same rules, same run.

The ingress checks every request against the workload's contract. pandera is the engine
for batches offline; per request its fixed cost dominates. This measures both on the
same rows so the choice rests on a number, not a guess.

    .venv/bin/python -m bench.online_validation
"""

from __future__ import annotations

import platform
import time
from datetime import date

import numpy as np
import pandas as pd

from app.workloads import get_workload
from data.validate import CompiledContract, check_rows

REPEATS_S = 2.0  # time budget per measurement


def per_call_ms(fn, *args) -> float:  # noqa: ANN001
    fn(*args)  # warm up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < REPEATS_S:
        fn(*args)
        calls += 1
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
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

        slow = per_call_ms(with_pandera, values)
        fast = per_call_ms(compiled.row_errors, values)
        rows.append(f"| {n:>5} | {slow:>10.3f} | {fast:>11.3f} | {slow / fast:>7.1f}x |")
    print(
        f"online validation, digits contract (64 columns), {date.today()}, "
        f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
