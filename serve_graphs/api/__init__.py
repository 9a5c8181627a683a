"""The HTTP surface of the graph, free of Ray: the FastAPI app (``app.build_api``), what a
request body becomes (``inputs``), the Open Inference Protocol (``oip``), the admin routes
(``admin``), the ASGI middlewares (``middleware``) and the per-replica meters
(``observe``). It imports ``serve_graphs.decide`` and nothing above it."""
