"""The roof of ``app``: the ``scaledl`` command line, the demo and the tables they print.

Everything here may import every stage (``data``, ``train``, ``serve_graphs``); nothing
outside this package imports it, so the ground floor of ``app`` (settings, errors, keys,
registry, workloads) stays importable by every stage without a cycle.
"""

from app.cli.main import main

__all__ = ["main"]
