"""The engine: slot state and KV cache as pytrees (`state`), pure jitted steps built once (`steps`), MTP speculative
decoding (`speculative`), the one sampling function (`sampling`), the host-side engine (`host`) and the one loop
that drives it (`driver`, used by `generation`, the batch script and the server)."""

from mimo_jax.engine.host import Engine, EngineFull, StepOutput

__all__ = ["Engine", "EngineFull", "StepOutput"]
