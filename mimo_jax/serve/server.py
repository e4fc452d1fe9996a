"""The served model as the routes see it (`Server`: tokenizer, chat template, scheduler, metrics, `Limits`)
and its request checks (model name, prompt, max tokens, stops, logprobs, sampling options, grammar specs)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.serve import protocol as P
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.scheduler import Scheduler
from mimo_jax.text import THINK_END, THINK_START, ChatTemplate, Tokenizer

SPEC_DECODE_METRICS_LEVELS = ("none", "summary", "detailed")


@dataclasses.dataclass
class Limits:
    max_context: int
    max_top_logprobs: int
    max_stop_ids: int
    request_timeout: float | None


class Server:
    """What the routes need: tokenizer, chat template, scheduler, metrics, limits."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        metrics: Metrics,
        *,
        model_name: str,
        eos_token_ids: tuple[int, ...],
        limits: Limits,
        sampling_defaults: dict[str, float] | None = None,
        grammar: Any = None,
        spec_decode_metrics: str = "none",
    ):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.template = template
        self.metrics = metrics
        self.model_name = model_name
        self.eos_token_ids = tuple(eos_token_ids)
        self.limits = limits
        # The engine's ConstraintFactory (mimo_jax.grammar.GrammarFactory); None: no constrained decoding.
        self.grammar = grammar
        # vLLM's --per-request-spec-decode-metrics: "none", "summary" or "detailed" (`jobs.spec_decode_metrics`)
        if spec_decode_metrics not in SPEC_DECODE_METRICS_LEVELS:
            levels = ", ".join(SPEC_DECODE_METRICS_LEVELS)
            raise ValueError(f"spec_decode_metrics={spec_decode_metrics!r}: expected one of {levels}")
        self.spec_decode_metrics = spec_decode_metrics
        # Defaults for omitted parameters (the checkpoint's generation_config.json; else OpenAI's).
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(sampling_defaults or {})}
        self.created = P.now()
        # `<think>` splitting needs both markers as tokens of this vocabulary.
        self.reasoning = tokenizer.token_id(THINK_START) is not None and tokenizer.token_id(THINK_END) is not None

    # ------------------------------------------------------------------ request checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise P.APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def check_sequences(self, count: int) -> None:
        if count > self.scheduler.max_waiting:
            raise P.invalid(
                f"this request asks for {count} sequences (prompts x n); the server queues at most "
                f"{self.scheduler.max_waiting}",
                "n",
            )

    def check_prompt_text(self, text: str, what: str) -> None:
        """Before tokenizing: refuse a text that no tokenization fits in the context (see `max_token_chars`)."""
        per_token, ctx = self.tokenizer.max_token_chars, self.limits.max_context
        if per_token is not None and len(text) >= ctx * per_token:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, your {what} has {len(text)} "
                f"characters, more than {ctx} tokens can hold. Please reduce the length of the input.",
                "messages" if what == "messages" else "prompt",
                "context_length_exceeded",
            )

    def check_prompt(self, prompt_ids: list[int], what: str) -> None:
        n, ctx = len(prompt_ids), self.limits.max_context
        if n == 0:
            raise P.invalid(f"the {what} is empty after tokenization", "messages" if what == "messages" else "prompt")
        if n >= ctx:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {n} tokens "
                "(no room left to generate). Please reduce the length of the input.",
                "messages" if what == "messages" else "prompt",
                "context_length_exceeded",
            )
        vocab = self.scheduler.engine.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise P.invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt", "invalid_value")

    def max_new_tokens(
        self, requested: int | None, param: str, prompt_len: int, default: int | None, minimum: int = 1
    ) -> int:
        """`minimum` 0: the request may only prefill (a completion that echoes or scores its prompt)."""
        ctx = self.limits.max_context
        room = ctx - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested < minimum:
            raise P.invalid(f"'{param}' must be at least {minimum}, got {requested}", param, "invalid_value")
        if requested > room:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} in the completion). "
                f"Please reduce the input or '{param}'.",
                param,
                "context_length_exceeded",
            )
        return requested

    def stop_ids(self, req: P.SamplingFields) -> tuple[int, ...]:
        vocab = self.scheduler.engine.config.vocab_size
        user = req.stop_ids()
        for t in user:
            if t >= vocab:
                raise P.invalid(f"stop token id {t} is outside the vocabulary [0, {vocab})", "stop", "invalid_value")
        ids = tuple(sorted(set(user) | (set() if req.ignore_eos else set(self.eos_token_ids))))
        if len(ids) > self.limits.max_stop_ids:
            raise P.invalid(
                f"{len(user)} stop token ids given; this server takes at most "
                f"{self.limits.max_stop_ids - len(self.eos_token_ids)} besides the model's EOS",
                "stop",
                "invalid_value",
            )
        return ids

    def check_logprobs(self, top: int | None, param: str) -> None:
        if top is not None and top > self.limits.max_top_logprobs:
            raise P.invalid(
                f"'{param}'={top} exceeds this server's limit of {self.limits.max_top_logprobs} "
                "(start it with a larger --max-logprobs)",
                param,
                "invalid_value",
            )

    def check_prompt_logprobs(self, req: P.SamplingFields) -> None:
        if req.prompt_logprobs is None:
            return
        if req.stream:  # as vLLM
            message = "'prompt_logprobs' is not available with stream=true"
            raise P.invalid(message, "prompt_logprobs", "unsupported_value")
        self.check_logprobs(req.prompt_logprobs, "prompt_logprobs")

    def sampling_options(
        self,
        req: P.SamplingFields,
        max_new: int,
        stop_ids: tuple[int, ...],
        logprobs,
        seed,
        prompt_logprobs: int | None = None,
        constraint: dict | None = None,
    ):
        pick = lambda value, name: self.defaults[name] if value is None else value
        if req.min_tokens > max_new:
            message = f"'min_tokens' ({req.min_tokens}) must not exceed the tokens to generate ({max_new})"
            raise P.invalid(message, "min_tokens")
        if req.logit_bias and max(int(k) for k in req.logit_bias) >= (vocab := self.scheduler.engine.config.vocab_size):
            raise P.invalid(f"'logit_bias' names a token outside the vocabulary [0, {vocab})", "logit_bias")
        return SamplingOptions(
            temperature=pick(req.temperature, "temperature"),
            top_p=pick(req.top_p, "top_p"),
            top_k=max(pick(req.top_k, "top_k"), 0),
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=seed,
            max_new_tokens=max_new,
            stop_token_ids=stop_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=req.min_tokens,
            logit_bias=req.logit_bias,
            constraint=constraint,
        )

    def constraint(self, spec: tuple[dict, str] | None, thinking: str | None) -> dict | None:
        """The checked constraint spec for `SamplingOptions.constraint` (None: unconstrained).

        `spec` is (spec, the request parameter it came from); a grammar that does not compile is a 400
        naming that parameter.
        """
        if spec is None:
            return None
        spec, param = spec
        if self.grammar is None:
            raise P.invalid(
                f"'{param}' needs constrained decoding, which this server does not have "
                "(its engine takes no constraints, or llguidance cannot read this tokenizer)",
                param,
                "unsupported_value",
            )
        if thinking is not None:
            spec = {**spec, "thinking": thinking}
        try:
            self.grammar.validate(spec)
        except ValueError as e:
            raise P.invalid(f"invalid value for '{param}': {e}", param, "invalid_value") from None
        return spec

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))
