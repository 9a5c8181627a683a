"""DeepSpeed as the training engines import it: no JIT build of an op training never uses."""

from __future__ import annotations

from train.engines import import_deepspeed


def test_the_engines_deepspeed_starts_its_backend_without_building_the_shm_op() -> None:
    # Without the skip, build_shm_op JIT-compiles (26-55 s on a cold cache) or loads
    # deepspeed_shm_comm and returns the module; the backend's __init__ calls it first.
    from deepspeed.comm.torch import build_shm_op

    import_deepspeed()
    assert build_shm_op() is None
