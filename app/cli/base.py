"""What every ``scaledl`` command shares: the console, and the settings of one invocation
(the ``--config`` file and ``--verbose`` of the root command, read by each command)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from app.settings import Settings, load_settings


@functools.cache
def console() -> Console:
    # Rich assumes 80 columns when output is not a terminal (CI, `ray job logs`): too
    # narrow for the report tables.
    return Console(width=None if sys.stdout.isatty() else 140)


WorkloadOpt = Annotated[str, typer.Option("--workload", "-w", help="Workload name, e.g. digits.")]


@dataclass(frozen=True)
class CliState:
    config: Path | None
    verbose: bool

    def settings(self, **overrides: Any) -> Settings:
        settings = load_settings(self.config, **overrides)
        settings.storage_root.mkdir(parents=True, exist_ok=True)
        return settings


def drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
