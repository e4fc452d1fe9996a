"""Constrained decoding in a speculative engine: constrained requests decode with the plain one-token loop over
their own rows (masks applied), the others keep speculating, against full-sequence forwards and the same
engine without constrained requests. The fake constraints of test_constraints stand in for a grammar backend."""

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from tests.fixtures import BUILT_CONSTRAINTS as BUILT
from tests.fixtures import TINY_CONFIG, next_token_logits, predictable_model
from tests.fixtures import fake_constraint as factory
from tests.fixtures import run_by_step as run

VOCAB = TINY_CONFIG.vocab_size
K = 2
PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7], [4, 6], [50, 1, 2, 3, 4, 5, 60, 61, 62], [20, 21, 22]]


@pytest.fixture(scope="module")
def lm():
    return mimo_jax.LanguageModel(predictable_model(noise=100.0, mtp_noise=300.0))


@pytest.fixture(scope="module")
def engine(lm):
    return Engine(
        lm,
        max_batch=4,
        max_context=48,
        prefill_chunk=4,
        max_round_tokens=4,
        max_top_logprobs=3,
        speculative_steps=K,
        constraint_factory=factory,
    )


def _spec_run(engine, requests, add_later=()):
    """`run`, with each request's accepted-draft counts and drafts, and the engine's speculation stats' change."""
    stats = engine.speculation
    before = (stats.target_forwards, stats.draft_tokens, stats.accepted_tokens, list(stats.accepted_at))
    accepted: dict = {}
    step = engine.step

    def recording_step(*args, **kwargs):
        outputs = step(*args, **kwargs)
        for o in outputs:
            got = accepted.setdefault(o.request_id, ([], []))
            got[0].extend(o.accepted)
            got[1].extend(o.drafts)
        return outputs

    engine.step = recording_step
    try:
        out = run(engine, requests, add_later)
    finally:
        del engine.step
    for rid, (acc, drafts) in accepted.items():
        out[rid]["accepted"], out[rid]["drafts"] = acc, drafts
    after = (stats.target_forwards, stats.draft_tokens, stats.accepted_tokens, list(stats.accepted_at))
    delta = [a - b for a, b in zip(after[:3], before[:3], strict=True)]
    delta.append([a - b for a, b in zip(after[3], before[3], strict=True)])
    return out, delta


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_constrained_requests_decode_plainly_beside_speculating_ones(lm, engine, overlap):
    """Greedy constrained output is the argmax of the masked full-forward logits (reported logprobs stay the
    model's); a sampled constrained one only emits allowed tokens; a script ends its request; the greedy and
    sampled unconstrained requests give the tokens and accepted drafts they give without the constrained ones;
    the speculation stats count only their verifies; nothing recompiles past one program per round size. The
    constrained rows' token is launched on its own, the others' round whole (no iteration is shared)."""
    engine.overlap = overlap
    free = SamplingOptions(max_new_tokens=30)
    hot = SamplingOptions(max_new_tokens=30, temperature=1.0, seed=7)
    unconstrained = {"free": (PROMPTS[2], free), "hot": (PROMPTS[3], hot)}
    alone, _ = _spec_run(engine, unconstrained)
    even = SamplingOptions(max_new_tokens=10, logprobs=3, constraint={"type": "even", "name": "even"})
    even_hot = SamplingOptions(max_new_tokens=10, temperature=1.0, seed=3, constraint={"type": "even", "name": "hot"})
    script = SamplingOptions(max_new_tokens=10, constraint={"type": "script", "tokens": [5, 9, 9, 1], "name": "s"})
    launches = set()  # (constrained rows, free rows, iterations) of each decode launch
    decode = engine._decode
    engine._decode = lambda running, n, *a: launches.add(_rows(running) + (n,)) or decode(running, n, *a)
    try:
        got, (forwards, draft_tokens, accepted_tokens, accepted_at) = _spec_run(
            engine,
            unconstrained,
            add_later=[
                (1, "even", PROMPTS[0], even),
                (1, "script", PROMPTS[1], script),
                (2, "even_hot", PROMPTS[1], even_hot),
            ],
        )
    finally:
        del engine._decode
    # the constrained rows' plain token is a launch of its own: the free rows' iterations speculate
    assert {(c > 0, f > 0, n) for c, f, n in launches} == {(True, False, 1), (False, True, 3)}, launches
    assert not engine.has_work()
    engine.overlap = False
    for rid in ("free", "hot"):
        assert (got[rid]["tokens"], got[rid]["reason"]) == (alone[rid]["tokens"], "length"), rid
        assert (got[rid]["accepted"], got[rid]["drafts"]) == (alone[rid]["accepted"], alone[rid]["drafts"]), rid
        assert all(len(d) == K for d in got[rid]["drafts"]) and got[rid]["steps"] & got["even"]["steps"]
    assert (got["script"]["tokens"], got["script"]["reason"]) == ([5, 9, 9, 1], "stop")
    for rid, name in (("even", "even"), ("even_hot", "hot")):
        tokens = got[rid]["tokens"]
        assert len(tokens) == 10 and got[rid]["reason"] == "length" and all(t % 2 == 0 for t in tokens), tokens
        assert BUILT[name].accepted == tokens
    for rid in ("even", "even_hot", "script"):  # they never drafted
        assert got[rid]["accepted"] == [] and got[rid]["drafts"] == [], rid
    tokens = got["even"]["tokens"]
    logits = next_token_logits(lm, PROMPTS[0], tokens)
    masked = np.where(np.arange(VOCAB) % 2 == 0, logits, -np.inf)
    assert tokens == masked.argmax(axis=-1).tolist()
    assert (logits.argmax(axis=-1) % 2).any()  # the mask changed something
    model_lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(got["even"]["logprobs"], model_lp[np.arange(10), tokens], atol=1e-4)
    # the stats: the unconstrained requests' verifies only
    verifies = got["free"]["accepted"] + got["hot"]["accepted"]
    assert (forwards, draft_tokens, accepted_tokens) == (len(verifies), K * len(verifies), sum(verifies))
    assert accepted_at == [sum(a > j for a in verifies) for j in range(K)]
    assert engine.constrained_decode_fn is not engine.decode_fn
    assert engine.constrained_decode_fn._cache_size() <= len(engine.steps.decode_buckets)
    assert engine.decode_fn._cache_size() <= len(engine.steps.decode_buckets)


def _rows(running) -> tuple[int, int]:
    """(constrained, free) requests among a launch's."""
    constrained = sum(r.constraint is not None for r in running)
    return constrained, len(running) - constrained
