"""The tables the CLI and the demo print. Pure: results in, rich renderables out."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from rich.table import Table

# The first image of scikit-learn's digits (a zero), for the curl example.
SAMPLE_DIGIT = [
    [0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0],
]  # fmt: skip

if TYPE_CHECKING:
    from app.cascade_spec import CascadeSpec
    from app.cli.traffic import TrafficReport
    from app.registry import ModelRef
    from app.serving import Endpoint
    from data.generate import GenerateReport
    from data.pipeline import IngestResult
    from data.versions import DatasetManifest
    from train.run import TrainOutcome


def ingest_table(result: IngestResult) -> Table:
    m = result.manifest
    table = Table(
        title=f"dataset {m.workload} {m.version}" + (" (reused)" if result.reused else "")
    )
    for col in ("rows in", "valid", "quarantined", *m.splits, "rows/s"):
        table.add_column(col, justify="right")
    rate = "—" if result.reused else f"{result.rows_per_s:,.0f}"
    counts = (m.rows_in, m.rows_valid, m.rows_quarantined, *m.splits.values())
    table.add_row(*(f"{n:,}" for n in counts), rate)
    return table


def dataset_summary(m: DatasetManifest) -> list:
    """What `scaledl data show` prints: lineage, files, quarantine, column statistics."""
    lines = [
        f"dataset {m.workload} {m.version}, created {m.created_at:%Y-%m-%d %H:%M} UTC, "
        f"parent {m.parent or '—'}, content {m.content_hash}"
        + (f", PII key {m.pii_key}" if m.pii_key else ""),
        "splits: " + ", ".join(f"{s} {n:,}" for s, n in m.splits.items()),
    ]
    files = Table("file", "bytes", "sha256", "records", "valid", "quarantined", title="sources")
    for s in m.sources:
        files.add_row(
            s.path, f"{s.size:,}", s.sha256[:12], f"{s.rows:,}", f"{s.rows_valid:,}",
            f"{s.rows_quarantined:,}" if s.unreadable is None else "the whole file",
        )  # fmt: skip
    parts: list = [*lines, files]
    parts += [
        f"quarantined whole: {s.path} ({s.kept or 'not copied: the workload holds PII'}): "
        f"{s.unreadable}"
        for s in m.sources
        if s.unreadable
    ]
    if m.quarantine_reasons:
        rules = Table("rule", "rows", title="quarantine")
        for rule, n in m.quarantine_reasons.items():
            rules.add_row(rule, f"{n:,}")
        parts.append(rules)
    if m.stats:
        columns = Table("column", "kind", "nulls", "median / top values", title="train split")
        for name, st in m.stats.items():
            if st.quantiles:
                q = st.quantiles
                shape = f"{q['0.5']:,.4g} (p1 {q['0.01']:,.4g}, p99 {q['0.99']:,.4g})"
            else:
                shape = ", ".join(f"{v} {n:,}" for v, n in list((st.top_values or {}).items())[:4])
            columns.add_row(name, st.kind, f"{st.nulls:,}", shape)
        parts.append(columns)
    parts.append("the whole manifest: scaledl data show <version> --json")
    return parts


def generate_table(report: GenerateReport) -> Table:
    table = Table(title=f"generated {len(report.files)} files")
    for col in ("records", "faulty", "records/s", "folder"):
        table.add_column(col, justify="right")
    folder = str(report.files[0].parent) if report.files else "—"
    faulty = sum(report.injected.values())
    table.add_row(f"{report.rows:,}", f"{faulty:,}", f"{report.rows_per_s:,.0f}", folder)
    for kind, n in sorted(report.injected.items()):
        table.add_row(f"  {kind}", f"{n:,}", "", "")
    return table


def quarantine_lines(result: IngestResult, limit: int = 10) -> list[str]:
    reasons = list(result.manifest.quarantine_reasons.items())
    files = [s for s in result.manifest.sources if s.unreadable]
    return [f"  quarantined {n:>7,}  {rule}" for rule, n in reasons[:limit]] + [
        f"  quarantined the whole file {s.path} ({s.kept or 'not copied: PII'}): {s.unreadable}"
        for s in files[:limit]
    ]


def training_table(outcomes: list[TrainOutcome]) -> Table:
    table = Table(
        "tier", "model", "test acc", "val acc", "ECE", "samples/s", "epochs", "ckpts",
        "resumed", "INT8 Δacc", "INT8 ×", "s", "fixed s",
        title="training",
        caption="fixed s: the run's seconds outside its training steps (start, DeepSpeed, "
        "the last checkpoint, scoring, registration); per phase in MLflow (phase_*_s)",
    )  # fmt: skip
    for o in outcomes:
        m = o.metrics
        resumed = f"step {m['resumed_from_step']:.0f}" if m["resumed_from_step"] >= 0 else "—"
        table.add_row(
            o.tier,
            o.model.label,
            f"{m['test_accuracy']:.4f}",
            f"{m['val_accuracy']:.4f}",
            f"{m['test_ece']:.4f}",
            f"{m['samples_per_s']:,.0f}",
            f"{m['epochs_run']:.0f}",
            str(o.checkpoints),
            resumed,
            f"{m['int8_accuracy_delta']:+.4f}",
            f"{m['int8_speedup_batch64']:.2f}x",
            f"{o.seconds:.0f}",
            f"{o.fixed_seconds:.0f}",
        )
    return table


def calibration_table(spec: CascadeSpec, ref: ModelRef) -> Table:
    caption = (
        f"cheap v{spec.cheap_version} answers at confidence >= {spec.threshold:.4f}, "
        f"else expensive v{spec.expensive_version}"
    )
    table = Table(
        "split", "cascade acc", "expensive acc", "cheap acc", "escalated",
        title=f"cascade {ref.label}", caption=caption,
    )  # fmt: skip
    for split in ("val", "test"):
        r = getattr(spec, split)
        table.add_row(
            split,
            f"{r.cascade_accuracy:.4f}",
            f"{r.expensive_accuracy:.4f}",
            f"{r.cheap_accuracy:.4f}",
            f"{r.escalated_share:.1%}",
        )
    return table


def traffic_table(outcomes: list[TrainOutcome], report: TrafficReport, concurrency: int) -> Table:
    n = report.answered
    table = Table(title=f"digits test split over HTTP ({n} requests, {concurrency} concurrent)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for o in outcomes:
        table.add_row(
            f"{o.tier} tier accuracy ({o.model.label})", f"{o.metrics['test_accuracy']:.4f}"
        )
    table.add_row("cascade accuracy (HTTP)", f"{report.accuracy:.4f}")
    table.add_row("share escalated to expensive", f"{report.escalated_share:.1%}")
    table.add_row("latency p50", f"{report.percentile_ms(50):.1f} ms")
    table.add_row("latency p99", f"{report.percentile_ms(99):.1f} ms")
    table.add_row("requests/s", f"{report.requests_per_s:.0f}")
    failed = sum(report.errors.values())
    table.add_row("failed requests", f"{failed} {report.errors}" if failed else "0")
    return table


def url_lines(endpoint: Endpoint, dashboard: str | None, dev_key: str | None) -> list[str]:
    lines = [f"API        {endpoint.predict_url}", f"OpenAPI    {endpoint.base_url}/docs"]
    if dashboard:
        lines.append(f"dashboard  {dashboard}")
        # Ray 2.60 starts local clusters with token auth: the dashboard opens on a token
        # prompt. Say where the token is, never the token itself (it admits to the cluster).
        lines.append(
            "           asks for Ray's token: `ray get-auth-token` prints it "
            "(a local cluster keeps it in ~/.ray/auth_token)"
        )
    if dev_key:
        lines.append(f"API key    {dev_key}   (development key, valid while this runs)")
        body = json.dumps({"instances": [SAMPLE_DIGIT]}, separators=(",", ":"))
        lines.append(
            f"try: curl -s -H 'Authorization: Bearer {dev_key}' "
            f"-H 'content-type: application/json' -d '{body}' {endpoint.predict_url}"
        )
    return lines
