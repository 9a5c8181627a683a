"""Faults of the cluster beneath a serving graph, under load, every request counted (the
chaos tier's client and table, tests/chaos/conftest.py): the GCS killed and restarted, a
worker node lost, and a busy tier scaling out across nodes and back in.

A ``ray.cluster_utils.Cluster`` of a head and two worker nodes whose GCS keeps its
state in a local ``redis-server``, as KubeRay's GCS fault tolerance
(``ray.io/ft-enabled``) keeps it in an external Redis. It serves the store the demo
trained, with two replicas of each tier and of the ingress, on the default transport.

Here, not in tests/chaos: that tier shares the integration tier's one-node cluster, and
one Ray cluster at a time runs on this machine. The system tier starts its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.keys import dev_key
from app.runtime import FAST_TRANSPORT
from app.serving import Endpoint, deploy
from app.settings import Settings, load_settings
from app.workloads import get_workload
from data.versions import DatasetStore
from serve_graphs.builder import INGRESS, tier_deployment
from tests.chaos.conftest import RECOVER_S, Load, chaos_settings, record, running, warmed
from tests.conftest import free_port
from tests.ray_platform import KEY

pytestmark = pytest.mark.slow

GCS_DOWN_S = 10.0  # how long the GCS stays dead: a head container's restart, about


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The distribution's redis-server on loopback, without persistence: the store of the
    GCS's tables (RAY_REDIS_ADDRESS)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not on PATH: `apt-get install redis-server` (.ci/run does)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class Served:
    cluster: object  # ray.cluster_utils.Cluster
    endpoint: Endpoint
    rows: np.ndarray  # the test split's features
    settings: Settings  # what it was deployed with


@pytest.fixture(scope="module")
def served(redis_address: str, trained_store: Path) -> Iterator[Served]:
    """The cluster, this process connected to it, and the graph deployed on it. Its
    variables (the transport, the Redis) are set only while it runs: the tier's other
    modules start clusters of their own."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            **FAST_TRANSPORT,
            "RAY_REDIS_ADDRESS": redis_address,
            # Replicas and handles report their load every half second (default 10 s),
            # as in the integration tier, so a scale-out shows within seconds.
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        }.items():
            env.setenv(name, value)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            settings = chaos_settings(trained_store, free_port())
            endpoint = deploy(settings, "digits", [dev_key(KEY)])
            yield Served(cluster, endpoint, test_split(trained_store), settings)
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    left = survivors(redis_address)
    assert not left, f"the cluster left these running after its shutdown: {left}"


def survivors(redis_address: str, wait_s: float = 15) -> list[str]:
    """Processes of the cluster on ``redis_address`` (they inherit RAY_REDIS_ADDRESS:
    raylets, the GCS, workers, Ray's HAProxy) still running after ``wait_s``, not
    counting this process. A node's workers exit shortly after its raylet."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "name", "environ"]):
            env = proc.info["environ"] or {}
            if proc.info["pid"] != os.getpid() and env.get("RAY_REDIS_ADDRESS") == redis_address:
                left.append(f"{proc.info['pid']} {proc.info['name']}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_split(store: Path) -> np.ndarray:
    workload = get_workload("digits")
    datasets = DatasetStore(load_settings(storage_root=store).datasets_dir)
    path = datasets.split_dir("digits", datasets.get("digits").version, "test")
    return pq.read_table(path).to_pandas()[list(workload.feature_columns)].to_numpy()


test_split.__test__ = False  # a helper, not a test


def control_plane_back(killed_at: float, seconds: dict[str, float]) -> None:
    """Time the cluster's own operations from the GCS's death until each answers again:
    a new actor created and called (what a deploy or an autoscaling step does to start
    a replica) and the node table (what the autoscaler reads)."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    probe = Probe.remote()
    ray.get(probe.ping.remote(), timeout=RECOVER_S + GCS_DOWN_S)
    seconds["actor created"] = time.monotonic() - killed_at
    ray.nodes()
    seconds["node table"] = time.monotonic() - killed_at
    ray.kill(probe)


def test_the_gcs_killed_and_restarted_on_redis_loses_no_request(served: Served) -> None:
    """The GCS process dies mid-load and starts again 10 s later on the same Redis (a
    head whose GCS restarts, as KubeRay's ft-enabled head does): requests go on through
    the proxies and replicas, which do not need the GCS to answer; creating an actor (a
    deploy, an autoscaling step) waits until the GCS is back."""
    head = served.cluster.head_node  # type: ignore[attr-defined]
    control: dict[str, float] = {}
    with Load(served.endpoint.predict_url, served.rows) as load:
        fault_at, baseline = warmed(load)
        head.kill_gcs_server()
        killed_at = time.monotonic()
        waiting = threading.Thread(target=control_plane_back, args=(killed_at, control))
        waiting.start()
        time.sleep(GCS_DOWN_S)
        head.start_gcs_server()
        restarted_at = load.now()
        waiting.join(timeout=RECOVER_S)
        assert "node table" in control, "the control plane never answered again"
        load.wait_recovered(fault_at, baseline, RECOVER_S)
    down = [a for a in load.answers if fault_at <= a.started < restarted_at]
    row = record(
        f"GCS killed, restarted on Redis after {GCS_DOWN_S:.0f} s", load, fault_at, baseline,
        note=f"{sum(a.status == 200 for a in down)} answered while it was down; "
        f"an actor created {control['actor created']:.1f} s after the kill, the node table "
        f"read {control['node table']:.1f} s after it",
    )  # fmt: skip
    assert row.lost == 0
    assert sum(a.status == 200 for a in down) > 0, "nothing was answered while the GCS was down"
    assert control["actor created"] >= GCS_DOWN_S  # it did wait for the GCS
    assert running(tier_deployment("cheap")) == 2  # Serve's own state survived the restart


def replica_nodes() -> dict[str, list[str]]:
    """Node id -> the deployments with a live replica there."""
    from ray.util.state import list_actors

    nodes: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        if actor.class_name.startswith("ServeReplica:digits:"):
            nodes.setdefault(actor.node_id, []).append(actor.class_name.rsplit(":", 1)[1])
    return nodes


def test_a_lost_worker_node_loses_only_what_its_ingress_held(served: Served) -> None:
    """The worker node that hosts a tier replica dies (its raylet and every process on
    it killed: a VM preempted). Its tier calls in flight are retried once on the twin
    (the ingress's whole retry budget, serve_graphs/decide/tier_calls.py), and Serve
    starts replacements on the nodes left.

    Lost is counted as for an ingress replica's death (README, "Faults"): a request the
    node's ingress replica was serving at that instant gets its connection closed
    without an answer; none other may be lost."""
    cluster = served.cluster
    cheap = tier_deployment("cheap")
    hosts = replica_nodes()
    workers = [n for n in cluster.worker_nodes if cheap in hosts.get(n.node_id, [])]  # type: ignore[attr-defined]
    assert workers, f"no worker node hosts a {cheap} replica: {hosts}"
    # One without an ingress replica when there is one: a tier replica's loss is the case.
    node = min(workers, key=lambda n: INGRESS in hosts[n.node_id])
    on_it = sorted(hosts[node.node_id])
    with Load(served.endpoint.predict_url, served.rows) as load:
        fault_at, baseline = warmed(load)
        cluster.remove_node(node, allow_graceful=False)  # type: ignore[attr-defined]
        died = load.now()
        deadline = time.monotonic() + 120
        while not all(running(d) == 2 for d in set(on_it)) or node.node_id in replica_nodes():
            assert time.monotonic() < deadline, f"{on_it} were never replaced: {replica_nodes()}"
            time.sleep(0.5)
        replaced_s = load.now() - died
        load.wait_recovered(fault_at, baseline, RECOVER_S)
    lost = [a for a in load.answers if a.outcome == "lost"]
    row = record(
        "worker node lost", load, fault_at, baseline,
        note=f"it hosted {', '.join(on_it)}; replacements running after {replaced_s:.1f} s; "
        f"{len(lost)} requests in flight on its ingress got no answer",
    )  # fmt: skip
    assert row.succeeded > 0 and row.full_capacity_s < RECOVER_S
    if INGRESS not in on_it:
        assert row.lost == 0
    assert len(lost) <= load.clients
    # remove_node kills the raylet; the node's workers, its ingress replica among them,
    # exit a moment later (a request sent 0.1 s after it returned was still taken).
    late = [
        (a.started, a.ended) for a in lost if not (a.started <= died + 1 and a.ended < died + 3)
    ]
    assert not late, (died, late)


def test_a_busy_tier_scales_out_across_nodes_and_back_in(served: Served) -> None:
    """A node joins (the one lost above replaced), the cheap tier may run 1 to 3
    replicas, and a load makes it busy (target_busy 0.5 %, so 8 clients do): Serve adds
    replicas on other nodes than the first one's, none of the load is lost, and once
    the load stops the tier goes back to one replica. The look-back is 11 s: Serve
    warns that one not above its metrics interval (10 s) will be refused."""
    served.cluster.add_node(num_cpus=2)  # type: ignore[attr-defined]
    served.cluster.wait_for_nodes()  # type: ignore[attr-defined]
    cheap = tier_deployment("cheap")
    busy = {"min_replicas": 1, "max_replicas": 3, "target_busy": 0.005, "upscale_delay_s": 0,
            "look_back_period_s": 11, "downscale_delay_s": 2}  # fmt: skip
    serve = served.settings.serve.model_dump() | {"cheap_replicas": busy}
    deploy(load_settings(storage_root=served.settings.storage_root, serve=serve), "digits",
           [dev_key(KEY)])  # fmt: skip
    deadline = time.monotonic() + 60
    while running(cheap) != 1:  # the redeploy's scale-in to min_replicas
        assert time.monotonic() < deadline, f"still {running(cheap)} cheap replicas"
        time.sleep(0.5)
    with Load(served.endpoint.predict_url, served.rows) as load:
        fault_at, baseline = warmed(load)
        deadline = time.monotonic() + 90
        # RUNNING as Serve counts them (a replica's actor is alive while it starts).
        while running(cheap) < 2 or len(set(nodes := cheap_nodes())) < 2:
            assert time.monotonic() < deadline, f"the busy tier did not scale out: {nodes}"
            time.sleep(0.5)
        out_s = load.now() - fault_at
        spread = len(set(nodes))
    stopped = time.monotonic()
    while running(cheap) > 1 or len(cheap_nodes()) > 1:
        assert time.monotonic() < stopped + 90, f"the idle tier did not scale in: {cheap_nodes()}"
        time.sleep(0.5)
    row = record(
        "busy tier scaled out and in", load, fault_at, baseline,
        note=f"{len(nodes)} cheap replicas on {spread} nodes {out_s:.1f} s into the load; "
        f"back to 1 replica {time.monotonic() - stopped:.1f} s after it stopped",
    )  # fmt: skip
    assert row.lost == 0
    assert spread >= 2, nodes


def cheap_nodes() -> list[str]:
    """The node of each live cheap-tier replica."""
    cheap = tier_deployment("cheap")
    return [node for node, names in replica_nodes().items() for name in names if name == cheap]
