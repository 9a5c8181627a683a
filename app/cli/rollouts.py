"""``scaledl rollout``: gated rollouts of a running service (canary steps judged on live
figures, automatic rollback and promotion).

Like ``scaledl route``, the commands call the service's admin routes over HTTP with an
admin key; the rollout runs in the cluster's rollout controller, not in this process.

    scaledl rollout start digits --challenger challenger --steps 5,25,50,100 --hold 2m
    scaledl rollout status digits
    scaledl rollout pause|resume|abort digits
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.base import console
from app.cli.routes import KeyFileOpt, UrlOpt, Workload, _call

rollout_cli = typer.Typer(
    help="Gated rollouts: canary steps judged against the champion, rollback or promotion.",
    no_args_is_help=True,
)


def show(view: dict[str, Any]) -> None:
    """The rollout as ``status`` prints it: where it stands, each step's verdict, and
    each gate's figures against its threshold."""
    out = console()
    weights = view["weights"] or {}
    shown = ", ".join(f"v{v} {w} %" for v, w in weights.items()) or "table cleared"
    out.print(
        f"[bold]{view['model']}[/]: v{view['challenger']} against v{view['champion']}, "
        f"[bold]{view['status']}[/] at step {view['step']} ({shown})"
    )
    if view["reason"]:
        out.print(f"  {view['reason']}")
    if view["hold_left_s"] is not None:
        out.print(
            f"  hold left {view['hold_left_s']:g} s, deadline in {view['deadline_in_s']:g} s"
            + (" (extended)" if view["extended"] else ""),
            style="dim",
        )
    steps = Table("step", "weight", "verdict", "gate", "figures", "threshold", "reason")
    for step in view["steps"]:
        label = f"{step['step']}{' ←' if step['current'] else ''}"
        verdict = step["verdict"] or "-"
        if not step["gates"]:
            steps.add_row(label, f"{step['weight']} %", verdict, "-", "-", "-", "-")
        for i, gate in enumerate(step["gates"]):
            figures = ", ".join(f"{k} {_num(v)}" for k, v in gate["figures"].items())
            limits = ", ".join(f"{k} {_num(v)}" for k, v in gate["thresholds"].items())
            steps.add_row(
                label if i == 0 else "",
                f"{step['weight']} %" if i == 0 else "",
                verdict if i == 0 else "",
                f"{gate['gate']}: {gate['verdict']}",
                figures,
                limits,
                gate["reason"],
            )
    out.print(steps)
    events = Table("event", "step", "weight", "verdict", "reason", title="events")
    for event in view["events"][-12:]:
        events.add_row(
            event["kind"],
            "shadow" if event["step"] == -1 else str(event["step"] + 1),
            f"{event['weight']} %",
            event["verdict"] or "-",
            event["reason"],
        )
    out.print(events)


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@rollout_cli.command("start")
def rollout_start(
    ctx: typer.Context,
    workload: Workload,
    challenger: Annotated[
        str, typer.Option(help="The cascade version or alias to roll out, e.g. 7 or challenger.")
    ],
    steps: Annotated[
        str, typer.Option(help="The challenger's percent at each step, ending at 100.")
    ] = "5,25,50,100",
    hold: Annotated[str, typer.Option(help="How long each step runs before its verdict.")] = "2m",
    min_requests: Annotated[
        int, typer.Option(help="Fewest requests per arm (and step) a verdict needs.")
    ] = 500,
    shadow_first: Annotated[
        str, typer.Option(help="Mirror traffic to the challenger this long first (0: no).")
    ] = "0",
    deadline: Annotated[
        str | None,
        typer.Option(
            help="By when a step must have its data (default 3x --hold).", show_default=False
        ),
    ] = None,
    champion: Annotated[
        str | None,
        typer.Option(
            help="The version to judge against (default: the deployed one).", show_default=False
        ),
    ] = None,
    url: UrlOpt = None,
    key_file: KeyFileOpt = None,
) -> None:
    """Start a rollout: the routing table moves through the steps, and at each the
    challenger is judged against the champion (errors, p99 and its shift, shadow
    disagreement). A fail rolls back at once; a pass at 100 % promotes."""
    body: dict[str, Any] = {
        "challenger": challenger,
        "steps": steps,
        "hold_s": hold,
        "min_requests": min_requests,
        "shadow_first_s": shadow_first,
    }
    if deadline is not None:
        body["deadline_s"] = deadline
    if champion is not None:
        body["champion"] = champion
    show(_call(ctx, "POST", workload, url, key_file, body, path="rollout"))


@rollout_cli.command("status")
def rollout_status(
    ctx: typer.Context, workload: Workload, url: UrlOpt = None, key_file: KeyFileOpt = None
) -> None:
    """The rollout: its steps and verdicts, each gate's figures and thresholds, its events."""
    show(_call(ctx, "GET", workload, url, key_file, path="rollout"))


def _command(name: str, doc: str) -> None:
    def command(
        ctx: typer.Context, workload: Workload, url: UrlOpt = None, key_file: KeyFileOpt = None
    ) -> None:
        show(_call(ctx, "POST", workload, url, key_file, path=f"rollout/{name}"))

    command.__doc__ = doc
    rollout_cli.command(name)(command)


_command("pause", "Hold the rollout at its step; its weights stay until resume or abort.")
_command("resume", "Restart the paused step: its weights written again, a fresh hold.")
_command("abort", "Back to the champion alone, at once.")
