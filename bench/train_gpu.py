"""bf16 training throughput and MFU of the expensive tier on one GPU (plain torch).

For a machine with a GPU (the lent H200): it needs only torch, numpy, pandas and
scikit-learn, which that image has. Prints samples/s and model FLOPs utilisation at
several batch sizes; the digits CNN is small, so MFU only approaches sensible values at
large batches.

    bash bench/train_gpu.sh
    .venv/bin/python -m bench.train_gpu --quick    # what make test runs; skips without CUDA
"""

from __future__ import annotations

import argparse
import sys
import time

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, from the spec sheets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 batch sizes, 1 s each; exit 0 without a GPU"
    )
    args = parser.parse_args()
    import torch

    from app.workloads import get_workload

    if not torch.cuda.is_available():
        if args.quick:  # make test runs on CPU machines too
            print("no CUDA device: skipped")
            return
        sys.exit("no CUDA device: run this on a GPU machine")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    workload = get_workload("digits")
    print(f"{name}, torch {torch.__version__}, peak bf16 {peak or '?'} TFLOP/s")
    print("| batch | samples/s | TFLOP/s | MFU |")
    print("|------:|----------:|--------:|----:|")
    for batch in (64, 1024) if args.quick else (64, 1024, 8192, 32768):
        samples, tflops = measure(workload, batch, 1.0 if args.quick else 3.0)
        mfu = f"{tflops / peak:.1%}" if peak else "?"
        print(f"| {batch:>5} | {samples:>9,.0f} | {tflops:>7.1f} | {mfu} |")


def measure(workload, batch: int, seconds: float) -> tuple[float, float]:  # noqa: ANN001
    """Samples/s and achieved TFLOP/s of bf16 training steps at ``batch``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model = workload.build_model("expensive").cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.rand(batch, len(workload.feature_columns), device="cuda")
    y = torch.randint(0, workload.num_classes, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    torch.cuda.synchronize()
    per_s = steps / (time.perf_counter() - started)
    return batch * per_s, counter.get_total_flops() * per_s / 1e12


if __name__ == "__main__":
    main()
