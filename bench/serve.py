"""Serving throughput: the scaledl graph against stock Ray Serve and LitServe, same run.

The same trained digits models served five ways, on one machine, in one run:

a  stock Ray Serve, one deployment: ``__call__`` parses the JSON and runs the cascade's
   expensive-tier model on each request (no FastAPI, no batching);
b  the same with ``@serve.batch`` (the tiers' BatchConfig: 64 rows, 5 ms);
c  LitServe 0.2.19, the same model and batching, one worker (``bench.serve_litserve``);
d  the scaledl graph exactly as ``scaledl serve`` deploys it (``app.serving.deploy``:
   the Ingress with auth, the input contract and routing, and the batched cheap and
   expensive TierModel deployments, the cheap one running the cascade),
   ``POST /v1/models/digits/predict`` with a key;
e  the same logic as ONE deployment (:class:`Monolith`): the same FastAPI app
   (``build_api``), routing, cascade, tiers (``decide.tier.Tier``), KeyRing and
   metrics, but the tiers are called in-process through two ``@serve.batch`` methods,
   not deployment handles.

a-c serve the expensive tier's model (``load_model``). Every request carries one
instance: by default the digits in turn, so d and e escalate the cascade's natural share
to the expensive tier (``--mix unsure``: every request is a digit the cheap tier is
unsure of, so d and e run both models; a-c run the heavier one only). Torch uses one
thread per replica everywhere, as the tiers do. d and e run again on a second cluster
started with the transport ``scaledl serve`` uses by default (``app.runtime.
FAST_TRANSPORT``: HAProxy, direct ingress, gRPC between deployments and Ray's throughput
bundle; ``d+t``, ``e+t``).

Load comes from ``wrk`` (one thread, ``-c`` keep-alive connections, the same POST in a
loop): a warmup run, then the measured one, at each concurrency. The client shares the
machine's cores (2 on the development VM) with the servers, so every setup pays the same
client. req/s counts answers below 400; errors are HTTP >= 400 plus socket errors and
timeouts (5 s). The CPU each process used during the measured run (psutil, Ray workers by
their title) is printed below the table, in cores and in CPU ms per answered request.
Without ``--store`` the pipeline runs first (ingest digits, train both tiers for
``--epochs``, calibrate and promote the cascade) into a temporary store.

    .venv/bin/python -m bench.serve                       # about 10 minutes on 2 cores
    .venv/bin/python -m bench.serve --store DIR --seconds 3 --concurrency 16 --setups a,d
    .venv/bin/python -m bench.serve --quick               # what make test runs: a-e, 1 s at 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from ray import serve
from starlette.requests import Request

from app.keys import dev_key
from app.model_artifact import load_model
from app.runtime import FAST_TRANSPORT
from app.sections import BatchConfig
from app.settings import load_settings
from app.workloads import TIERS, get_workload
from bench import wrk
from bench.serve_models import DIGITS, model_targets, prepare, request_bodies
from bench.serve_report import report
from serve_graphs.api.app import build_api
from serve_graphs.args import GraphArgs, IngressConfig, TierConfig
from serve_graphs.builder import INGRESS, tier_deployment
from serve_graphs.decide.cascade import CascadeCaller, Instances, TierAnswer
from serve_graphs.decide.coalesce import Coalescer
from serve_graphs.decide.routing import Routing
from serve_graphs.decide.tier import Probs, Tier, TierRunner, Work, batch_rows
from serve_graphs.ingress import tune_gc
from serve_graphs.metrics import ServeMetrics
from serve_graphs.tier_model import BATCH as TIER_BATCH
from serve_graphs.tier_model import load_runner

PATH = f"/v1/models/{DIGITS}/predict"
# The baselines batch single requests, which need a window to meet in: 5 ms, the
# tiers' default until 2026-11-29 (the graph's ingress coalesces, so its tiers wait 0).
BASELINE_BATCH = BatchConfig(batch_wait_timeout_s=0.005)
MAX_ONGOING = 64  # the scaledl ingress's default, for every single-deployment setup


def respond(probs: np.ndarray) -> dict:
    """The baselines' answer: label and confidence per instance."""
    return {
        "predictions": [{"label": int(p.argmax()), "confidence": float(p.max())} for p in probs]
    }


def instances(body: dict) -> np.ndarray:
    """The baselines' parsing: the JSON ``instances`` as a float matrix."""
    return np.asarray(body["instances"], dtype=np.float64)


class PerRequest:
    """(a): the model on every request."""

    def __init__(self, model_dir: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.runner = TierRunner(load_model(Path(model_dir)), "baseline")

    async def __call__(self, request: Request) -> dict:
        return respond(self.runner.model.predict_proba(instances(await request.json())))


class Batched(PerRequest):
    """(b): requests gathered by ``@serve.batch`` into one forward pass."""

    async def __call__(self, request: Request) -> dict:
        return respond(await self.predict_batch(instances(await request.json())))

    @serve.batch(
        max_batch_size=BASELINE_BATCH.max_batch_size,
        batch_wait_timeout_s=BASELINE_BATCH.batch_wait_timeout_s,
    )
    async def predict_batch(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        return self.runner.predict_many(batches)


@serve.deployment
@serve.ingress()
class Monolith:
    """(e): the Ingress's app and cascade with both tiers inside the same replica.

    Built from the same args and user_configs as the graph (``builder.user_configs``),
    so it serves the same versions with the same threshold and batching. Requests here
    hold one row, so TierModel's chunking of large requests is left out."""

    def __init__(self, args: dict, configs: dict) -> None:
        import torch

        torch.set_num_threads(1)
        tune_gc()  # as the graph's ingress does
        self.args = GraphArgs.model_validate(args)
        cfg = self.args.serve
        tiers = {t: TierConfig.model_validate(configs[tier_deployment(t)]) for t in TIERS}
        for method in (self.predict_cheap, self.predict_expensive):
            method.set_max_batch_size(tiers["cheap"].batch.max_batch_size)
            method.set_batch_wait_timeout_s(tiers["cheap"].batch.batch_wait_timeout_s)
        max_rows = tiers["cheap"].batch.max_batch_size
        expensive = Tier(self.predict_expensive, _no_routed, max_rows=max_rows)

        async def answer(rows: Instances) -> TierAnswer:
            return TierAnswer(*await expensive.predict(rows))

        self.tiers = {
            "expensive": expensive,
            "cheap": Tier(
                self.predict_cheap,
                _no_routed,
                max_rows=max_rows,
                # As TierModel calls the expensive tier, in-process instead of a handle.
                expensive=lambda model_id: Coalescer(
                    answer,
                    max_in_flight=cfg.tier_calls_in_flight,
                    max_rows=max_rows,
                    max_waiting_rows=cfg.tier_max_waiting_rows,
                    timeout_s=cfg.expensive_timeout_s,
                    name="expensive",
                ),
                breaker_failures=cfg.breaker_failures,
                breaker_reset_s=cfg.breaker_reset_s,
            ),
        }
        for t, c in tiers.items():
            self.tiers[t].swap(load_runner(self.args.tracking_uri, c.model), c.model)
        ingress = IngressConfig.model_validate(configs[INGRESS])
        self.cascade = CascadeCaller(
            lambda rows: self.tiers["cheap"].cascade(rows, self.cascade.route())
        )
        self.cascade.calibrated(ingress.cascade_version, ingress.cheap_version, ingress.threshold)

    @serve.batch(
        max_batch_size=TIER_BATCH.max_batch_size,
        batch_wait_timeout_s=TIER_BATCH.batch_wait_timeout_s,
        batch_size_fn=batch_rows,
    )
    async def predict_cheap(self, batch: list[Work]) -> list[Probs]:
        return await self.tiers["cheap"].run_batch(batch)

    @serve.batch(
        max_batch_size=TIER_BATCH.max_batch_size,
        batch_wait_timeout_s=TIER_BATCH.batch_wait_timeout_s,
        batch_size_fn=batch_rows,
    )
    async def predict_expensive(self, batch: list[Work]) -> list[Probs]:
        return await self.tiers["expensive"].run_batch(batch)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from app.keys import KeyRing

        cfg = self.args.serve
        return build_api(
            get_workload(self.args.workload),
            Routing.fixed(self.cascade, self.cascade.version),
            keys=KeyRing(self.args.api_keys),
            max_instances=cfg.max_instances_per_request,
            max_body_bytes=cfg.max_body_bytes,
            request_timeout_s=cfg.request_timeout_s,
            observer=ServeMetrics(),
        )


async def _no_routed(model_id: str) -> TierRunner:
    raise AssertionError("the monolith serves its pinned versions only")


# --- the children: one cluster, LitServe ----------------------------------------------


def deploy_setup(setup: str, plan: dict, **overrides: dict) -> str:
    """Deploy one setup on the running Serve instance; its URL. ``overrides``: settings
    sections to change (``ops={"live_stats": False}``)."""
    from app.serving import deploy

    settings = load_settings(
        storage_root=Path(plan["store"]),
        serve={"host": "127.0.0.1", "port": plan["port"]},
        **overrides,
    )
    keys = [dev_key(plan["key"], "bench")]
    if setup == "d":
        return deploy(settings, DIGITS, keys).predict_url
    if setup == "e":
        from serve_graphs.builder import stable_args, user_configs

        args = GraphArgs.from_settings(settings, DIGITS, keys, None)
        app = Monolith.options(
            max_ongoing_requests=args.serve.ingress_max_ongoing_requests,
            max_queued_requests=args.serve.ingress_max_queued_requests,
        ).bind(stable_args(args), user_configs(args))
    else:
        cls = {"a": PerRequest, "b": Batched}[setup]
        app = serve.deployment(cls, max_ongoing_requests=MAX_ONGOING).bind(plan["model_dir"])
    serve.run(app, name=f"bench-{setup}", route_prefix="/")
    return f"http://127.0.0.1:{plan['port']}{PATH}"


def cluster(plan: dict, setups: list[str]) -> dict:
    """One local cluster (the env decides its transport): each setup deployed, probed,
    measured, deleted."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": plan["port"]})
        for setup in setups:
            url = deploy_setup(setup, plan)
            results[setup] = load(url, plan, key=plan["key"] if setup in "de" else None)
            serve.delete(DIGITS if setup == "d" else f"bench-{setup}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def load(url: str, plan: dict, key: str | None) -> dict:
    """A checked first answer, then wrk at each concurrency."""
    answer = wrk.probe(url, plan["bodies"][0], key)
    runs = wrk.measure(
        url, plan["bodies"], key, plan["concurrency"], plan["seconds"], plan["warmup"]
    )
    print(f"  {url}: {json.dumps(answer)[:160]}", file=sys.stderr)
    return {
        "answer": answer,
        "runs": {str(c): asdict(r) for c, (r, _) in runs.items()},
        "cpu": {str(c): cpu for c, (_, cpu) in runs.items()},
    }


def run_litserve(plan: dict, log: Path) -> dict:
    """(c) in its own process group, measured from here, then stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.serve", "--child", "litserve", json.dumps(plan)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        return load(f"http://127.0.0.1:{plan['port']}{PATH}", plan, key=None)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_cluster(plan: dict, setups: list[str], env: dict[str, str], log: Path) -> dict:
    """``cluster`` in a child process, so ``env`` reaches every process of the cluster."""
    return run_child("bench.serve", ["cluster", json.dumps(plan), *setups], env, log)


def run_child(module: str, args: list[str], env: dict[str, str], log: Path) -> dict:
    """``python -m <module> --child <args>``: a benchmark's cluster in a process of its
    own (``env`` reaches every Ray process), its stderr in ``log``; the JSON line it
    printed last. No other Ray cluster may run before or after it."""
    check_no_ray("before starting a cluster")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token", **env},
    )
    check_no_ray("after the cluster stopped")
    if proc.returncode != 0:
        raise SystemExit(
            f"the cluster run of {module} failed; see {log}:\n{log.read_text()[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_report_only(parser: argparse.ArgumentParser) -> None:
    """``--report-only``: the checks printed, a FAIL not an exit code (make test)."""
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="print the checks but exit 0 on a FAIL (make test: a shared machine's noise "
        "must not fail the suite; the committed table is the measurement)",
    )


def store_with_cascade(store: Path | None, epochs: int, tmp: Path) -> Path:
    """``store`` as given, or the pipeline run into ``tmp/store`` first (ingest, both
    tiers for ``epochs``, a promoted cascade), on a cluster of its own."""
    if store is not None:
        return store
    store = tmp / "store"
    print(f"training both tiers ({epochs} epochs) into {store}", file=sys.stderr)
    check_no_ray("before training")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [sys.executable, "-m", "bench.serve", "--child", "prepare", str(store), str(epochs)]
    with (tmp / "prepare.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=log, env=env)
    check_no_ray("after training")
    return store


def check_no_ray(when: str) -> None:
    import psutil

    for _ in range(60):  # a stopped cluster's raylet takes a moment to exit
        raylets = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
        if not raylets:
            return
        time.sleep(0.5)
    raise SystemExit(f"a Ray cluster is running {when} (raylet pids {raylets}): stop it first")


# --- the run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="a,b,c,d,e", help="any of a,b,c,d,e")
    parser.add_argument("--concurrency", default="1,16,64", help="wrk connections, per run")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3, help="warmup seconds per run")
    parser.add_argument(
        "--transport",
        choices=("both", "stock", "fast"),
        default="both",
        help="stock: skip the d+t, e+t runs; fast: run d and e only with the transport",
    )
    parser.add_argument("--store", type=Path, help="reuse a storage root with a cascade")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs without --store")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument(
        "--mix",
        choices=("digits", "unsure", "sure"),
        default="digits",
        help="digits: requests cycle through 256 digits (the cascade escalates its natural "
        "share); unsure: every request holds one digit the cheap tier is unsure of (every "
        "request runs both tiers: the cascade's worst case); sure: 256 digits the cheap tier "
        "is sure of (no request escalates: what escalation costs, by difference)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a-e on the stock cluster only (bench.overload runs the fast transport), at 16, "
        "1 s runs without warmup, 1 epoch",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.quick:
        args.concurrency, args.seconds, args.warmup, args.epochs = "16", 1, 0, 1
        args.transport = "stock"  # one cluster: the second costs a minute on 2 cores

    wrk.require_wrk()
    setups = [s for s in "abcde" if s in args.setups.split(",")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scaledl-bench-serve-") as tmp:
        store = store_with_cascade(args.store, args.epochs, Path(tmp))
        bodies, model_dir, note = request_bodies(store, args.mix)
        plan = {
            "store": str(store),
            "port": args.port,
            "key": os.urandom(16).hex(),
            "bodies": bodies,
            "model_dir": model_dir,
            "concurrency": [int(c) for c in args.concurrency.split(",")],
            "seconds": args.seconds,
            "warmup": args.warmup,
        }
        results, skipped = {}, []
        stock = [s for s in setups if s != "c"] if args.transport != "fast" else []
        if stock:
            print(f"stock cluster: {stock}", file=sys.stderr)
            results |= run_cluster(plan, stock, {}, Path(tmp) / "stock.log")
        if "c" in setups:
            if importlib.util.find_spec("litserve") is None:
                skipped.append("c skipped: litserve is not installed (pip install -e '.[bench]')")
            else:
                print("litserve", file=sys.stderr)
                results["c"] = run_litserve(plan, Path(tmp) / "litserve.log")
        fast = [s for s in setups if s in "de"] if args.transport != "stock" else []
        if fast:
            print(f"transport cluster: {fast}", file=sys.stderr)
            runs = run_cluster(plan, fast, FAST_TRANSPORT, Path(tmp) / "transport.log")
            results |= {f"{s}+t": r for s, r in runs.items()}
        models = model_targets(store)  # the cascade's and INT8's targets, no cluster up
    print(json.dumps(results), file=sys.stderr)  # the raw runs, for a second look
    print(report(results, plan, note, skipped, time.monotonic() - started))
    print("\n".join(models))


def child(mode: str, *rest: str) -> None:
    if mode == "prepare":
        prepare(rest[0], int(rest[1]))
    elif mode == "cluster":
        print(json.dumps(cluster(json.loads(rest[0]), list(rest[1:]))))
    elif mode == "litserve":
        from bench.serve_litserve import serve as litserve

        plan = json.loads(rest[0])
        litserve(plan["model_dir"], plan["port"], PATH)


if __name__ == "__main__":
    main()
