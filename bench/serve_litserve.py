"""Setup (c) of ``bench.serve``: the expensive tier's model on LitServe, batched.

Its own module, imported only in the LitServe child process: LitServe is an optional
extra (``pip install -e '.[bench]'``), and its worker processes import the API by name.
"""

from __future__ import annotations

from pathlib import Path

import litserve as ls
import numpy as np

from app.model_artifact import load_model
from bench.serve import BASELINE_BATCH, instances, respond
from serve_graphs.tier_model import TierRunner


class DigitsAPI(ls.LitAPI):
    """One request's rows in, label and confidence out; LitServe gathers up to the same
    batch as stock Serve's (b) (64 requests, 5 ms: ``BASELINE_BATCH``)."""

    def __init__(self, model_dir: str, api_path: str) -> None:
        super().__init__(
            max_batch_size=BASELINE_BATCH.max_batch_size,
            batch_timeout=BASELINE_BATCH.batch_wait_timeout_s,
            api_path=api_path,
        )
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.runner = TierRunner(load_model(Path(self.model_dir)), "litserve")

    def decode_request(self, request: dict) -> np.ndarray:
        return instances(request)

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # predict_many stacks them and splits the answer back

    def predict(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return self.runner.predict_many(batch)

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray) -> dict:
        return respond(output)


def serve(model_dir: str, port: int, api_path: str) -> None:
    server = ls.LitServer(DigitsAPI(model_dir, api_path), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
