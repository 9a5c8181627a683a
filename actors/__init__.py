"""Long-lived named actors: serving statistics and the rollout controller (drift next).

Ray-free logic first; the ``@ray.remote`` wrappers come with their wiring:

- ``stats``: the per-replica ``Recorder`` (exact, mergeable summaries per cascade version
  and 10 s bucket) and the ``StatsStore`` that merges them into windows;
- ``gates``: the judging gates (errors, latency, shadow), a list that later gates join;
- ``rollout_spec`` and ``rollout``: a rollout's spec, state and events, and the
  ``Controller`` that steps the routing table and promotes or rolls back through ports.
"""
