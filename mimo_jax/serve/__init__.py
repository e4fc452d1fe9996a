"""OpenAI-compatible HTTP serving (`python -m mimo_jax.serve`): routes, scheduler, chat template, parsers, metrics."""
