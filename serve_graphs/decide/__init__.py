"""The graph's decisions, free of Ray: which cascade version answers a request
(``routing``), whether the cheap tier's answer stands or the expensive tier's is needed
(``cascade``, behind a ``breaker``), how concurrent calls to a tier go as one
(``coalesce``), how a call to a tier fails (``tier_calls``), and which loaded model
version answers which rows in which forward pass (``tier``). It imports nothing else of
``serve_graphs``."""
