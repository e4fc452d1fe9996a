"""`generate(model, prompts, ...)`: complete token-id prompts with the engine (exported as `mimo_jax.generate`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mimo_jax.engine.driver import Driver, RoundPlan
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions, check_seed, derived_seed
from mimo_jax.lm import LanguageModel
from mimo_jax.model.mimo import MiMoModel


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # model logprob of each generated token, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the model's top-N (id, logprob)
    # speculation: drafts accepted by each target forward (verify) of this request, in order
    accepted_per_forward: list[int] | None = None
    speculative_steps: int = 0

    @property
    def mean_accept_length(self) -> float | None:
        """Tokens per target forward, bonus included (mean of accepted + 1); None without speculation or
        when the first token was the last (no forward)."""
        a = self.accepted_per_forward
        return sum(a) / len(a) + 1 if a else None

    @property
    def acceptance_rates(self) -> list[float] | None:
        """Per draft position j (0..k-1): the fraction of this request's target forwards that accepted draft j."""
        a = self.accepted_per_forward
        if not a:
            return None
        return [sum(x > j for x in a) / len(a) for j in range(self.speculative_steps)]


def generate(
    model: LanguageModel | MiMoModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] = 0,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    max_batch: int = 32,
    prefill_chunk: int = 512,
    max_context: int | None = None,
    speculative_steps: int = 0,
    engine: Engine | None = None,
) -> list[GenerationResult]:
    """Complete every prompt (a list of token ids, any lengths); one result per prompt, in order.

    Stops at `stop_token_ids` and, unless `ignore_eos`, the model's EOS tokens (the stop token is
    the last of `token_ids`, finish_reason "stop"), else after `max_new_tokens` ("length").
    `seed` is one int (prompt i draws from stream (seed, i)) or one seed per prompt, each a signed
    64-bit integer (`mimo_jax.engine.sampling.check_seed`).
    `logprobs=N` returns each token's model logprob and the top-N. Prompts beyond `max_batch`
    wait for a free slot (continuous batching). Pass `engine` to reuse a compiled engine.
    `speculative_steps=k` drafts k tokens per target forward with the model's MTP layers (load
    it with `mtp=True`); the output is the same (greedy) or distributed the same (sampling), and
    each result reports `mean_accept_length` and `acceptance_rates`.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if isinstance(seed, int):
        seeds = [derived_seed(seed, i) for i in range(len(prompts))]
    else:
        for s in seed:
            check_seed(s)
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if engine is None:
        lm = model if isinstance(model, LanguageModel) else LanguageModel(model)
        eos = () if ignore_eos else tuple(lm.config.eos_token_ids)
        stops = len(set(stop_token_ids) | set(eos))
        engine = Engine(
            lm,
            max_batch=min(max_batch, len(prompts)),
            max_context=max_context or max(len(p) for p in prompts) + max_new_tokens + 1,
            prefill_chunk=prefill_chunk,
            max_stop_ids=max(stops, 1),
            max_top_logprobs=logprobs or 0,
            max_round_tokens=min(max_new_tokens, 64),
            speculative_steps=speculative_steps,
        )
    elif speculative_steps != engine.speculative_steps:
        raise ValueError(f"speculative_steps={speculative_steps}, but the engine has {engine.speculative_steps}")
    eos = () if ignore_eos else tuple(engine.config.eos_token_ids)
    stop = tuple(sorted(set(stop_token_ids) | set(eos)))
    options = [
        SamplingOptions(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            seed=s,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop,
            logprobs=logprobs,
        )
        for s in seeds
    ]
    results: list[GenerationResult | None] = [None] * len(prompts)
    pending = list(range(len(prompts)))[::-1]
    driver = Driver(engine)
    while pending or engine.has_work():
        # Prefill everything waiting before decoding: generate() has no latency target.
        plan = RoundPlan(step=True, prefill_tokens=1 << 62)
        for _ in range(min(len(pending), engine.free_slots)):
            i = pending.pop()
            plan.add_request(i, prompts[i], options[i])
            results[i] = GenerationResult(
                [],
                "",
                [] if logprobs is not None else None,
                [] if logprobs else None,
                [] if engine.speculative_steps else None,
                engine.speculative_steps,
            )
        for out in driver.run(plan):
            r = results[out.request_id]
            r.token_ids.extend(out.token_ids)
            if r.logprobs is not None:
                r.logprobs.extend(out.logprobs)
            if r.top_logprobs is not None:
                r.top_logprobs.extend(out.top_logprobs)
            if r.accepted_per_forward is not None:
                r.accepted_per_forward.extend(out.accepted)
            if out.finished:
                r.finish_reason = out.finish_reason
    return results
