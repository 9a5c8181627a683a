"""The sections of the settings, one per stage (``ingest:``, ``train:``, ``calibrate:``,
``serve:``, ``ops:``): what each can be configured with, its defaults and its rules. How they are
loaded, and the top-level keys, are :mod:`app.settings`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _label_selector(labels: dict[str, str]) -> dict[str, str]:
    """Ray's own check of a label selector (``ray start --labels`` keys and values)."""
    from ray._private.label_utils import validate_label_selector

    problem = validate_label_selector(labels)
    if problem:
        raise ValueError(f"not a Ray label selector: {problem}")
    return labels


NodeLabels = Annotated[dict[str, str], AfterValidator(_label_selector)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(_Section):
    """How raw files become a dataset version."""

    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15),
        description="train/val/test shares; rows are assigned by a hash of their id, "
        "so the same row always lands in the same split.",
    )
    max_quarantine_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Fail the run when more than this share of rows is quarantined.",
    )
    pushgateway_url: str | None = Field(
        None,
        description="Prometheus pushgateway (e.g. http://127.0.0.1:9091) that each ingest "
        "run pushes its figures to (data/metrics.py); unset: the manifest only. A failed "
        "push warns and the ingest goes on.",
    )
    on_unreadable_file: Literal["fail", "quarantine"] = Field(
        "fail",
        description="A raw file that cannot be read at all (empty, no usable header, a "
        "broken Parquet footer or page): 'fail' refuses the run, naming the file; "
        "'quarantine' keeps the file whole in the version's quarantine_files/ with its "
        "reason in the manifest (for a workload with PII it is named, not copied) and "
        "goes on with the rest. 'quarantine' reads each file once more, to find a damaged "
        "page before the pass.",
    )
    max_dataset_age_s: float | None = Field(
        7 * 86400.0,
        gt=0,
        description="Pushed with the figures: the dataset freshness alert fires when the "
        "workload's newest version is older than this (unset: no alert for it).",
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> IngestConfig:
        if any(f <= 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(
                "ingest.split_fractions must be three positive shares (train, val, test) "
                f"that sum to 1, got {list(self.split_fractions)}"
            )
        return self


class TrainConfig(_Section):
    """One training run of one tier; becomes the DeepSpeed config inside the workers.

    Batch arithmetic: global batch = micro_batch_size x grad_accumulation x data-parallel
    width, where the data-parallel width is num_workers / pipeline_stages.
    """

    num_workers: int = Field(2, ge=1, description="Ray Train workers (stages x data parallel).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    use_gpu: bool = Field(False, description="Train on GPU workers (NCCL) instead of CPU (gloo).")
    node_labels: NodeLabels = Field(
        {},
        description="Ray node labels a training worker's node must carry (a label "
        "selector), e.g. {'scaledl.io/pool': 'batch'}: the spot pool of "
        "cluster/autoscaler/. Empty: any node.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU. fp16 needs a GPU."
    )
    epochs: int = Field(12, ge=1, description="Most passes over the training split.")
    micro_batch_size: int = Field(16, ge=1, description="Rows per worker per forward pass.")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-2, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of steps spent warming the LR up; then linear decay."
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 disables).")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO: keep optimizer state on the CPU.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters on the CPU.")
    pipeline_stages: int = Field(
        1, ge=1, description="Pipeline-parallel stages (DeepSpeed PipelineModule); 1 = off."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better val accuracy."
    )
    checkpoint_every_epochs: int = Field(1, ge=1, description="Epochs between checkpoints.")
    checkpoints_to_keep: int = Field(
        2, ge=1, description="Best checkpoints (by val accuracy) kept; the latest is kept too."
    )
    log_every_steps: int = Field(10, ge=1, description="Optimizer steps between MLflow metrics.")
    cache_inputs_below_mb: float | None = Field(
        None,
        ge=0,
        description="A worker keeps what it reads of a split (its share; on a pipeline's "
        "stages the whole split) as tensors when under this many MB of model inputs on "
        "every worker, and streams it every epoch otherwise (0: always stream). A test or "
        "calibration split under it is scored in the driver, above it with Ray Data "
        "tasks. Unset: 5 % of the memory of the worker's node (its container's limit "
        "where it has one).",
    )
    max_failures: int = Field(
        1, ge=0, description="Worker failures to recover from (resuming from the last checkpoint)."
    )

    @property
    def data_parallel(self) -> int:
        return self.num_workers // self.pipeline_stages

    @property
    def dtype(self) -> Literal["fp32", "bf16", "fp16"]:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    @model_validator(mode="after")
    def _layout_is_possible(self) -> TrainConfig:
        problems = []
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            problems.append(
                f"train.zero_stage={self.zero_stage} with train.pipeline_stages="
                f"{self.pipeline_stages}: DeepSpeed pipelines take ZeRO stage 0 or 1"
            )
        if self.pipeline_stages > self.num_workers:
            problems.append(
                f"train.pipeline_stages={self.pipeline_stages} needs at least that many "
                f"workers, train.num_workers is {self.num_workers}"
            )
        elif self.num_workers % self.pipeline_stages:
            problems.append(
                f"train.num_workers={self.num_workers} is not a multiple of "
                f"train.pipeline_stages={self.pipeline_stages} (workers = stages x data parallel)"
            )
        if self.offload_params and self.zero_stage != 3:
            problems.append("train.offload_params needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append("train.offload_optimizer needs train.zero_stage >= 1")
        if self.precision == "fp16" and not self.use_gpu:
            problems.append("train.precision=fp16 needs train.use_gpu=true (use fp32 or bf16)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CalibrateConfig(_Section):
    """How the cascade's threshold is chosen."""

    margin: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Cascade accuracy may trail the expensive tier alone by at most this "
        "(0.005 = 0.5 points) on the validation split; within it, escalate as little as possible.",
    )


class BatchConfig(_Section):
    """Dynamic batching of a tier (its Serve ``user_config``, applied in place)."""

    max_batch_size: int = Field(
        64,
        ge=1,
        description="Most rows (from any number of requests) in one forward pass; a larger "
        "request is split into chunks of this many rows.",
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=0.05,
        description="Longest wait for a batch to fill (<= 50 ms). 0: a batch starts as "
        "soon as the replica is free, with every call queued by then. Its callers already "
        "send concurrent requests as one call and hold the rest until a call returns, "
        "so a wait at the tier only delays them (bench/results/2026-11-29-serve.md: 5 ms "
        "cost 7-10 % of the graph's throughput and 10 ms of p99 at 64 clients).",
    )


class _Scaling(_Section):
    """Serve autoscaling settings that the tiers and the ingress share."""

    min_replicas: int = Field(
        1,
        ge=0,
        description="0 lets a tier scale to zero when idle; then the first request "
        "waits for a cold start (for the expensive tier, past serve.expensive_timeout_s "
        "the cheap answer returns with degraded=true meanwhile).",
    )
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    upscale_delay_s: float = Field(3.0, ge=0, description="Sustained load before adding one.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle time before removing one.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the load is averaged over.")

    @model_validator(mode="after")
    def _min_below_max(self) -> _Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
        return self

    def autoscaling_config(self) -> dict[str, float]:
        """As Serve takes it; scaling to zero waits as long as scaling down does."""
        return {**self.model_dump(), "downscale_to_zero_delay_s": self.downscale_delay_s}


class TierScaling(_Scaling):
    """How many replicas a tier runs: enough that each is ``target_busy`` busy
    (serve_graphs/scaling.py). Its calls in flight say nothing of its load: they are
    their callers' coalesced calls, a few per replica however many rows wait."""

    target_busy: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Share of its time a tier replica should spend running batches; "
        "the tier scales out when its replicas are busier, in when they are idler. "
        "Lower: more headroom for bursts, more replicas.",
    )

    def autoscaling_config(self) -> dict[str, float]:
        """Without the policy's own setting, which serve_graphs.builder passes to it."""
        config = super().autoscaling_config()
        del config["target_busy"]
        return config


class IngressScaling(_Scaling):
    """The ingress's replicas, on Serve's default policy: HTTP requests in flight."""

    target_ongoing_requests: float = Field(
        32, gt=0, description="HTTP requests in flight per replica the autoscaler aims at."
    )


class RateLimit(_Section):
    """A token bucket per API key: ``per_s`` tokens a second, at most ``burst`` saved."""

    per_s: float = Field(gt=0, description="Requests a second one key may send, sustained.")
    burst: int = Field(ge=1, description="Requests one key may send at once after a pause.")


class Fault(_Section):
    """A fault injected into one cascade version (``serve.faults``): for tests and
    development only, so rollouts and chaos tests can make a version bad on purpose."""

    fail_share: float = Field(
        0.0, ge=0, le=1, description="Share of the version's requests answered 500."
    )
    delay_ms: float = Field(
        0.0, ge=0, le=60_000, description="Milliseconds added to each of its requests."
    )


class ServeConfig(_Section):
    """The HTTP service."""

    host: str = Field("127.0.0.1", description="Interface Serve's HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP port.")
    cascade_ref: str = Field(
        "champion",
        description="Calibrated cascade to serve (alias or version of <workload>-cascade): "
        "it names both tier versions and the threshold.",
    )
    batch: BatchConfig = BatchConfig()
    ingress_max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one ingress replica works on at once."
    )
    tier_max_ongoing_requests: int = Field(
        128, ge=1, description="Requests one tier replica holds at once; room to form batches."
    )
    ingress_max_queued_requests: int = Field(
        128,
        ge=1,
        description="Requests waiting for an ingress replica; past it Serve's proxy answers "
        "503 at once instead of letting requests hang.",
    )
    tier_max_queued_requests: int = Field(
        256,
        ge=1,
        description="Calls waiting in Serve for a tier replica; past it the request gets a "
        "503 with Retry-After (or a degraded answer, for the expensive tier). Its callers "
        "keep only serve.tier_calls_in_flight calls out per replica, so this is a backstop: "
        "the bound that acts under load is serve.tier_max_waiting_rows.",
    )
    tier_max_waiting_rows: int = Field(
        128,
        ge=1,
        description="Rows one caller (an ingress replica for the cheap tier, a cheap-tier "
        "replica for the expensive one) lets wait for a tier while its calls are out; a "
        "request past it gets a 503 with Retry-After at once (for the expensive tier: a "
        "degraded answer), instead of waiting out its timeout. About two batches: a "
        "request that is let wait is sent within about one round of calls.",
    )
    rate_limits: dict[Literal["predict", "admin"], RateLimit] = Field(
        {},
        description="Per-key rate limits by the scope a route needs, e.g. "
        "{predict: {per_s: 50, burst: 100}}; a key over its limit gets a 429 with "
        "Retry-After. None by default.",
    )
    keys_poll_s: float = Field(
        2.0,
        gt=0,
        description="How often each ingress replica checks the keys file for a change: a "
        "key created or revoked takes effect within this time, without a restart.",
    )
    max_instances_per_request: int = Field(1024, ge=1, description="Instances in one request.")
    max_body_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest request body; a larger one is a 413."
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a request's whole body may take to arrive; past it the answer "
        "is a 408, so a client that sends slowly (slowloris) holds a request slot no longer.",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Longest a prediction may take; past it the answer is a 504."
    )
    expensive_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Longest wait for the expensive tier; past it the cheap answer returns "
        "with degraded=true.",
    )
    breaker_failures: int = Field(
        5,
        ge=1,
        description="Expensive-tier failures in a row that open its circuit breaker (one "
        "per cheap-tier replica and cascade version).",
    )
    breaker_reset_s: float = Field(
        10.0, gt=0, description="Seconds an open breaker waits before one trial request."
    )
    cheap_replicas: TierScaling = TierScaling()
    expensive_replicas: TierScaling = TierScaling()
    ingress_replicas: IngressScaling = Field(
        IngressScaling(min_replicas=1, max_replicas=1),
        description="Ingress replicas (auth, contract, routing). One by default: "
        "the cost and A/B reports are per replica. The ingress is the graph's busiest "
        "process (bench/serve.py), so give it more where there are cores for them.",
    )
    fast_transport: bool = Field(
        True,
        description="Start a local cluster with Ray 2.60's HAProxy ingress, direct ingress "
        "and gRPC between deployments: about 3x the graph's throughput at 64 clients "
        "(bench/serve.py). A cluster that is joined needs the same variables set before "
        "`ray start` (see cluster/README.md); false keeps Ray's stock proxy.",
    )
    int8_tiers: list[Literal["cheap", "expensive"]] = Field(
        [],
        description="Tiers served by the INT8 twin of their cascade version (registered "
        "with its measured speed-up and accuracy delta; a tiny model may run slower in "
        "int8). A changed list is applied to running replicas in place (a hot swap).",
    )
    route_header: str = Field(
        "x-scaledl-user",
        pattern=r"^[a-z0-9-]+$",
        description="Request header whose value assigns a user to one version of the "
        "routing table (sticky A/B); requests without it are assigned at random by weight.",
    )
    routes_poll_s: float = Field(
        2.0,
        gt=0,
        description="How often each ingress replica reads the routing table from the "
        "registry: a table set through one replica reaches the others within this time.",
    )
    shadow_max_in_flight: int = Field(
        8,
        ge=1,
        description="Shadow copies one ingress replica runs at once; past it copies are "
        "dropped (and counted), so mirroring never queues the primary path.",
    )
    tier_calls_in_flight: int = Field(
        2,
        ge=1,
        description="Calls a caller keeps out at once to the tier it calls (an ingress "
        "replica to the cheap tier, a cheap-tier replica to the expensive tier), per routed "
        "version and running replica of the tier; requests that arrive meanwhile go "
        "together in the next call "
        "(at most serve.batch.max_batch_size rows). Fewer, fuller calls: the per-call cost "
        "of a Serve hop is paid per batch, not per request (bench/serve.py).",
    )
    faults: dict[str, Fault] = Field(
        {},
        description="Tests and development only (refused without dev): cascade version -> "
        "a fault injected into its requests, e.g. {'4': {fail_share: 0.2}} or "
        "{'4': {delay_ms: 50}}. Applied in place, without a restart.",
    )
    tier_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per tier replica.")
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    node_labels: NodeLabels = Field(
        {},
        description="Ray node labels the node of every replica (tiers and ingress) must "
        "carry (a label selector), e.g. {'scaledl.io/pool': 'serve'}: the on-demand pool "
        "of cluster/autoscaler/. Empty: any node.",
    )

    @property
    def base_url(self) -> str:
        """Where a client on this host reaches the service."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


class OpsConfig(_Section):
    """What keeps a served model healthy by itself: the live statistics every ingress
    replica reports to one named actor (actors/serving_stats.py), which the routes view
    and the rollout controller read as time windows."""

    live_stats: bool = Field(
        True,
        description="Ingress replicas count requests, outcomes, latency and shadow agreement "
        "per cascade version and report them to the serving-stats actor. Off: the routes "
        "view has no figures and gated rollouts cannot judge.",
    )
    report_every_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="How often each ingress replica sends what it counted, off the request "
        "path; a replica that dies loses at most this much.",
    )
    stats_bucket_s: float = Field(
        10.0, gt=0, le=300, description="Width of one time bucket of the live statistics."
    )
    stats_retention_s: float = Field(
        3600.0, ge=60, description="How long the serving-stats actor keeps buckets."
    )
