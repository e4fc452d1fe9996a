"""Offline batch inference over a JSONL file (`python -m mimo_jax.batch`); see `mimo_jax.batch.run`."""

from mimo_jax.batch.run import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SKIPPED,
    Aborted,
    InputError,
    Request,
    ResultWriter,
    RunSettings,
    RunSummary,
    WorkItem,
    id_key,
    load_tokenizer,
    main,
    parse_line,
    request_seed,
    run_batch,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SKIPPED",
    "Aborted",
    "InputError",
    "Request",
    "ResultWriter",
    "RunSettings",
    "RunSummary",
    "WorkItem",
    "id_key",
    "load_tokenizer",
    "main",
    "parse_line",
    "request_seed",
    "run_batch",
]
