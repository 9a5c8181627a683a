"""DeepSpeed engines for the two layouts a run can take.

- ``DataParallel``: every worker holds the model (ZeRO 0-3 shards its state) and reads
  its share of the training data.
- ``Pipeline``: the model's layers are split into stages (DeepSpeed ``PipelineModule``),
  and stages x data-parallel groups = workers. Every stage of a pipe must see the same
  batches, so each worker reads the whole split in a fixed order and keeps the batches
  of its data-parallel group.

Both read their splits through a ``Feed`` (train/feeds.py) and expose ``train_epoch``,
``evaluate`` and ``full_state_dict`` to the loop.
``train_epoch`` logs to MLflow every ``train.log_every_steps`` and counts every
micro-batch into the run's live figures (train/metrics.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from app.workloads import get_workload
from train.job import TrainJob, micro_batches_per_group
from train.metrics import LiveFigures

if TYPE_CHECKING:
    import torch

    from train.feeds import Feed

StepLog = Callable[[int, dict[str, float]], None]


def build_engine(job: TrainJob) -> DataParallel | Pipeline:
    return Pipeline(job) if job.train.pipeline_stages > 1 else DataParallel(job)


def import_deepspeed() -> Any:
    """DeepSpeed, without the shared-memory collective op that training never calls.

    DeepSpeed's torch backend JIT-builds ``deepspeed_shm_comm`` on every CPU rank
    when it starts (26-55 s on this machine, again whenever the venv's path changes).
    Only ``inference_all_reduce`` (tensor-parallel inference) uses it; training's
    collectives are ``torch.distributed``'s over gloo. Marking the op incompatible
    makes ``build_shm_op`` return None, which DeepSpeed handles as "no shm op".
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class _StepMeter:
    """Loss, rows and time between two MLflow step logs, and over the epoch; each
    micro-batch also goes into the run's live figures.

    Throughput is global: this worker's rows times the data-parallel width (every
    data-parallel rank processes an equal share).
    """

    def __init__(self, log: StepLog, every: int, data_parallel: int, live: LiveFigures) -> None:
        self.log, self.every, self.width, self.live = log, every, data_parallel, live
        self.rows = self.window_rows = 0
        self.loss_sum = self.window_loss = 0.0
        self.started = self.window_started = time.perf_counter()
        self.first_step_at = self.last_step_at = 0.0  # Unix times, for the run's phases

    def add(self, rows: int, loss: float, step: int, lr: float, *, stepped: bool) -> None:
        self.last_step_at = time.time()
        self.first_step_at = self.first_step_at or self.last_step_at
        self.live.add(rows, loss, stepped=stepped)
        self.rows += rows
        self.window_rows += rows
        self.loss_sum += loss * rows
        self.window_loss += loss * rows
        if stepped and step % self.every == 0:
            seconds = time.perf_counter() - self.window_started
            self.log(
                step,
                {
                    "step_loss": self.window_loss / max(self.window_rows, 1),
                    "step_samples_per_s": self.window_rows * self.width / seconds
                    if seconds
                    else 0.0,
                    "lr": lr,
                },
            )
            self.window_rows, self.window_loss = 0, 0.0
            self.window_started = time.perf_counter()

    def summary(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        return {
            "train_loss": self.loss_sum / max(self.rows, 1),
            "samples_per_s": self.rows * self.width / seconds if seconds else 0.0,
            "first_step_at": self.first_step_at,
            "last_step_at": self.last_step_at,
        }


def over_workers(values: list[float], op: str = "sum") -> list[float]:
    """``values`` reduced over every worker of the run (``op``: sum, min or max), on the
    device the run's process group runs its collectives on (NCCL takes GPU tensors
    only). Alone, outside a process group: the values themselves."""
    import torch
    import torch.distributed as dist

    reduced = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized():
        return reduced.tolist()
    if dist.get_backend() == "nccl":
        reduced = reduced.cuda()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    dist.all_reduce(reduced, op=ops[op])
    return reduced.cpu().tolist()


def _val_metrics(loss_sum: float, correct: float, rows: float) -> dict[str, float]:
    loss_sum, correct, rows = over_workers([loss_sum, correct, rows])
    return {"val_loss": loss_sum / max(rows, 1), "val_accuracy": correct / max(rows, 1)}


class DataParallel:
    def __init__(self, job: TrainJob) -> None:
        deepspeed = import_deepspeed()
        self.job = job
        self.dtype = _torch_dtype(job.train.dtype)
        model = get_workload(job.workload).build_model(job.tier)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=job.deepspeed
        )

    def train_epoch(
        self, feed: Feed, epoch: int, log: StepLog, live: LiveFigures
    ) -> dict[str, float]:
        import torch.nn.functional as F

        cfg, engine = self.job.train, self.engine
        engine.train()
        meter = _StepMeter(log, cfg.log_every_steps, cfg.data_parallel, live)
        batches = feed.batches(cfg.micro_batch_size, epoch=epoch, drop_last=True)
        for x, y in itertools.islice(batches, self.job.micro_batches_per_epoch):
            loss = F.cross_entropy(engine(x.to(self.dtype)), y)
            engine.backward(loss)
            stepped = engine.is_gradient_accumulation_boundary()
            engine.step()
            lr = float(engine.get_lr()[0])
            meter.add(len(y), float(loss), engine.global_steps, lr, stepped=stepped)
        return meter.summary()

    def evaluate(self, feed: Feed) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        self.engine.eval()
        loss_sum = correct = rows = 0.0
        with torch.no_grad():
            for x, y in feed.batches(256, epoch=None, drop_last=False):
                logits = self.engine(x.to(self.dtype)).float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                rows += len(y)
        return _val_metrics(loss_sum, correct, rows)

    def held(self) -> dict[str, int | str]:
        """What of the model this rank holds: every parameter, or under ZeRO-3 its
        partition of each (``ds_tensor``)."""
        params = self.engine.module.parameters()
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return {"parameters_held": int(held)}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights (every rank takes part; ZeRO-3 gathers)."""
        import deepspeed

        module = self.engine.module
        if self.job.train.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


class Pipeline:
    def __init__(self, job: TrainJob) -> None:
        import torch.nn.functional as F
        from deepspeed.pipe import LayerSpec, PipelineModule

        deepspeed = import_deepspeed()
        self.job = job
        self.dtype = _torch_dtype(job.train.dtype)
        deepspeed.init_distributed(dist_backend="nccl" if job.train.use_gpu else "gloo")
        layers = get_workload(job.workload).layers(job.tier)
        module = PipelineModule(
            layers=[LayerSpec(spec.cls, *spec.args) for spec in layers],
            num_stages=job.train.pipeline_stages,
            loss_fn=F.cross_entropy,
            partition_method="parameters",
        )
        self.engine, *_ = deepspeed.initialize(
            model=module, model_parameters=module.parameters(), config=job.deepspeed
        )
        self.dp_rank = self.engine.grid.get_data_parallel_rank()

    def _pairs(
        self, feed: Feed, *, epoch: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This data-parallel group's (x, y) micro-batches, identical on every stage."""
        cfg = self.job.train
        batches = feed.batches(cfg.micro_batch_size, epoch=epoch, drop_last=True)
        mine = itertools.islice(batches, self.dp_rank, None, cfg.data_parallel)
        for x, y in itertools.islice(mine, micro_batches_per_group(feed.rows, cfg)):
            yield x.to(self.dtype), y

    def train_epoch(
        self, feed: Feed, epoch: int, log: StepLog, live: LiveFigures
    ) -> dict[str, float]:
        cfg, engine = self.job.train, self.engine
        engine.train()
        meter = _StepMeter(log, cfg.log_every_steps, cfg.data_parallel, live)
        pairs = self._pairs(feed, epoch=epoch)
        rows_per_step = cfg.micro_batch_size * cfg.grad_accumulation
        for _ in range(self.job.steps_per_epoch):
            loss = engine.train_batch(data_iter=pairs)
            lr = float(engine.get_lr()[0])
            meter.add(rows_per_step, float(loss), engine.global_steps, lr, stepped=True)
        return meter.summary()

    def evaluate(self, feed: Feed) -> dict[str, float]:
        import torch.nn.functional as F

        self.engine.eval()
        loss_sum = correct = rows = 0.0
        for x, y in self._pairs(feed, epoch=None):
            _, logits = self.engine.eval_batch(
                iter([(x, y)]), return_logits=True, num_micro_batches=1
            )
            if self.engine.is_last_stage():
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                rows += len(y)
        return _val_metrics(loss_sum, correct, rows)

    def held(self) -> dict[str, int | str]:
        """What of the model this rank holds: its stage's layers (``first-last``, as
        indices of the whole model's) and their parameters, no other stage's."""
        module = self.engine.module
        first, last = module._local_start, module._local_stop - 1  # set by partitioning
        return {
            "stage": int(module.stage_id),
            "layers": f"{first}-{last}",
            "parameters_held": int(sum(p.numel() for p in module.parameters())),
        }

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights: every stage's layers, gathered to all ranks.

        PipelineModule names each layer by its index in the full sequence, as
        ``nn.Sequential`` does, so the merged dict loads into the plain model.
        """
        import torch.distributed as dist

        mine = {}
        if self.dp_rank == 0:
            mine = {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()}
        parts: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}
