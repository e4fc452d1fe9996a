"""Sampling filters and penalties on a tiny vocabulary against their definitions (float64 numpy)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.engine.sampling import (
    SamplingOptions,
    SamplingParams,
    check_seed,
    processed_logprobs,
    request_key,
    sample,
    step_keys,
)

V = 11
ROWS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 3, 1.0, 0.0),
    (1.3, 0, 0.6, 0.0),
    (1.0, 0, 1.0, 0.2),
    (0.5, 5, 0.8, 0.05),
    (2.0, 1, 1.0, 0.0),
    (1.0, 0, 0.01, 0.0),
    (0.0, 4, 0.5, 0.3),  # greedy: filters do not matter
]


def reference_probs(logits, temperature, top_k, top_p, min_p):
    """The sampled distribution, written from the definitions."""
    x = np.asarray(logits, np.float64)
    if temperature == 0:
        out = np.zeros(V)
        out[np.argmax(x)] = 1.0
        return out
    x = x / temperature
    keep = np.ones(V, bool)
    order = sorted(range(V), key=lambda i: -x[i])
    if top_k:
        keep &= x >= x[order[top_k - 1]]
    if top_p < 1:
        probs = np.exp(x - x.max()) * keep
        probs /= probs.sum()
        kept_p, mass = np.zeros(V, bool), 0.0
        for i in order:  # the shortest most-likely-first prefix whose mass reaches top_p
            if not keep[i]:
                break
            kept_p[i] = True
            mass += probs[i]
            if mass >= top_p:
                break
        keep &= kept_p
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep &= probs >= min_p * probs.max()
    out = np.where(keep, np.exp(x - x.max()), 0.0)
    return out / out.sum()


def reference_penalties(logits, counts, prompt_mask, presence, frequency, repetition):
    out = np.asarray(logits, np.float64).copy()
    for t in range(V):
        out[t] -= frequency * counts[t] + presence * (counts[t] > 0)
        if counts[t] > 0 or prompt_mask[t]:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    return out


def params_of(rows):
    cols = list(zip(*rows, strict=True))
    return SamplingParams.make(len(rows), temperature=cols[0], top_k=cols[1], top_p=cols[2], min_p=cols[3])


@pytest.fixture(scope="module")
def logits():
    return np.random.RandomState(0).randn(len(ROWS), V).astype(np.float32) * 2


def test_processed_distribution_matches_definitions(logits):
    got = np.exp(np.asarray(processed_logprobs(jnp.asarray(logits), params_of(ROWS))))
    for row, (t, k, p, m) in enumerate(ROWS):
        np.testing.assert_allclose(
            got[row], reference_probs(logits[row], t, k, p, m), atol=2e-6, err_msg=str(ROWS[row])
        )


def test_each_row_uses_its_own_parameters(logits):
    """A row's distribution does not depend on its neighbours' parameters (whether the batch sorts or not)."""
    alone = processed_logprobs(jnp.asarray(logits[3:4]), params_of(ROWS[3:4]))
    mixed = processed_logprobs(jnp.asarray(logits), params_of(ROWS))
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(mixed)[3])


def test_penalties_match_definitions():
    rs = np.random.RandomState(1)
    logits = rs.randn(3, V).astype(np.float32)
    counts = rs.randint(0, 3, (3, V)).astype(np.int32) * (rs.rand(3, V) < 0.4)
    prompt_mask = rs.rand(3, V) < 0.3
    pens = [(0.5, 0.0, 1.0), (0.0, 0.3, 1.0), (0.2, 0.1, 1.7)]
    cols = list(zip(*pens, strict=True))
    params = SamplingParams.make(
        3, temperature=1.0, presence_penalty=cols[0], frequency_penalty=cols[1], repetition_penalty=cols[2]
    )
    got = np.exp(np.asarray(processed_logprobs(jnp.asarray(logits), params, jnp.asarray(counts), prompt_mask)))
    for row in range(3):
        pen = reference_penalties(logits[row], counts[row], prompt_mask[row], *pens[row])
        np.testing.assert_allclose(got[row], reference_probs(pen, 1.0, 0, 1.0, 0.0), atol=2e-6)


def test_draws_follow_the_processed_distribution(logits):
    n = 20000
    for row in (0, 2, 4):
        params = params_of([ROWS[row]] * n)
        keys = jax.random.split(jax.random.key(row), n)
        tokens = np.asarray(sample(jnp.broadcast_to(jnp.asarray(logits[row]), (n, V)), params, keys).tokens)
        freq = np.bincount(tokens, minlength=V) / n
        want = reference_probs(logits[row], *ROWS[row])
        assert np.all(freq[want == 0] == 0)
        np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / n))


def test_greedy_logprobs_and_top_n(logits):
    params = params_of(ROWS)
    out = sample(jnp.asarray(logits), params, jax.random.split(jax.random.key(0), len(ROWS)), num_top=3)
    model_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    tokens = np.asarray(out.tokens)
    assert tokens[-1] == logits[-1].argmax()
    np.testing.assert_allclose(out.logprobs, model_lp[np.arange(len(ROWS)), tokens], rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1)[:, :3])
    np.testing.assert_allclose(out.top_logprobs, np.sort(model_lp, axis=-1)[:, ::-1][:, :3], rtol=1e-6)
    for row, (t, k, p, m) in enumerate(ROWS):
        assert reference_probs(logits[row], t, k, p, m)[tokens[row]] > 0


def test_keys_depend_on_seed_and_position_only():
    data = jnp.asarray(np.stack([request_key(7), request_key(7), request_key(8)]))
    logits = jnp.zeros((3, 1000))
    params = SamplingParams.make(3, temperature=1.0)
    a = np.asarray(sample(logits, params, step_keys(data, jnp.array([5, 5, 5]))).tokens)
    b = np.asarray(sample(logits, params, step_keys(data, jnp.array([6, 5, 5]))).tokens)
    assert a[0] == a[1] != a[2]
    assert b[1] == a[1] and b[0] != a[0]


def test_seeds_are_64_bit_and_used_whole():
    """One rule: any signed 64-bit seed, every bit of it in the key; seeds of [0, 2**32) keep jax.random.key's key."""
    seeds = [0, 1, 2**31, 2**32, -(2**32), -1, 2**63 - 1, -(2**63), 2**32 + 1]
    keys = {tuple(request_key(s)) for s in seeds}
    assert len(keys) == len(seeds)
    for s in (0, 5, 2**31 - 1, 2**31, 2**32 - 1):
        np.testing.assert_array_equal(request_key(s), jax.random.key_data(jax.random.key(s)))
    for bad in (2**63, -(2**63) - 1, 2**64, 10**30):
        with pytest.raises(ValueError) as error:
            check_seed(bad)
        message = str(error.value)
        assert message == f"seed must be an integer in [-2**63, 2**63) (a signed 64-bit integer), got {bad}"
        with pytest.raises(ValueError, match=re.escape(message)):
            SamplingOptions(seed=bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            request_key(bad)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63"):
        import mimo_jax

        mimo_jax.generate(None, [[1]], max_new_tokens=1, seed=2**63)


# ----------------------------------------------------------------------------- logit_bias, min_tokens, token masks
def reference_restrict(logits, allowed_ids, bias, stop_ids, generated, min_tokens):
    """Before the penalties: the mask (-inf), logit_bias (added), then min_tokens (stop ids -inf while fewer
    than min_tokens were generated, unless that leaves nothing)."""
    out = np.asarray(logits, np.float64).copy()
    out[[t for t in range(V) if t not in allowed_ids]] = -np.inf
    for t, b in bias.items():
        out[t] += b
    if generated < min_tokens and any(np.isfinite(out[t]) for t in range(V) if t not in stop_ids):
        out[list(stop_ids)] = -np.inf
    return out


RESTRICTED = [  # allowed ids, logit_bias, stop ids, generated, min_tokens, temperature
    (range(V), {}, (), 0, 0, 1.0),
    (range(V), {2: -100.0, 5: 3.5, 7: -1.25}, (), 0, 0, 1.0),
    ((1, 4, 6, 9), {4: 2.0}, (), 0, 0, 0.8),
    (range(V), {}, (3, 8), 2, 3, 1.0),  # stop tokens banned: 2 generated < 3
    (range(V), {3: 100.0}, (3, 8), 3, 3, 1.0),  # 3 generated: allowed again (and +100 forces 3)
    ((3, 8), {}, (3, 8), 0, 5, 1.0),  # the mask leaves only stop tokens: the mask wins over min_tokens
    ((0, 2, 10), {10: -100.0}, (2,), 1, 4, 0.0),  # greedy
    (range(V), {6: 100.0}, (), 0, 0, 0.0),  # greedy, +100 forces a token
]


def restricted_inputs(logits):
    from mimo_jax.engine.constraints import bitmask_of

    allowed = np.stack([bitmask_of(r[0], V) for r in RESTRICTED])
    stops = np.full((len(RESTRICTED), 2), -1, np.int32)
    counts = np.zeros((len(RESTRICTED), V), np.int32)
    for i, (_, _, stop, generated, _, _) in enumerate(RESTRICTED):
        stops[i, : len(stop)] = stop
        counts[i, 1] = generated  # min_tokens counts every generated token (here all token 1)
    params = SamplingParams.make(
        len(RESTRICTED),
        logit_bias=[r[1] for r in RESTRICTED],
        max_logit_bias=4,
        min_tokens=[r[4] for r in RESTRICTED],
        temperature=[r[5] for r in RESTRICTED],
    )
    return params, jnp.asarray(counts), jnp.asarray(stops), jnp.asarray(allowed)


def test_bias_min_tokens_and_mask_match_definitions():
    logits = np.random.RandomState(2).randn(len(RESTRICTED), V).astype(np.float32) * 2
    params, counts, stops, allowed = restricted_inputs(logits)
    assert params.bias_ids.shape == (len(RESTRICTED), 4)
    got = np.exp(np.asarray(processed_logprobs(jnp.asarray(logits), params, counts, None, stops, allowed)))
    for row, (ids, bias, stop, generated, min_tokens, t) in enumerate(RESTRICTED):
        restricted = reference_restrict(logits[row], ids, bias, stop, generated, min_tokens)
        np.testing.assert_allclose(got[row], reference_probs(restricted, t, 0, 1.0, 0.0), atol=2e-6, err_msg=str(row))
    assert got[3, [3, 8]].sum() == 0 and got[4, 3] > 0.99 and got[5, [3, 8]].sum() == pytest.approx(1.0)
    assert got[6].argmax() == 0 and got[7].argmax() == 6  # 2 banned (min_tokens), 10 biased away


def test_sampled_tokens_respect_mask_and_logprobs_stay_the_models():
    logits = np.random.RandomState(3).randn(len(RESTRICTED), V).astype(np.float32) * 2
    params, counts, stops, allowed = restricted_inputs(logits)
    n = 64
    tile = lambda x: jnp.repeat(x, n, axis=0)
    out = sample(
        tile(jnp.asarray(logits)),
        jax.tree.map(tile, params),
        jax.random.split(jax.random.key(0), n * len(RESTRICTED)),
        tile(counts),
        num_top=3,
        stop_ids=tile(stops),
        allowed=tile(allowed),
    )
    tokens = np.asarray(out.tokens).reshape(len(RESTRICTED), n)
    for row, (ids, bias, stop, generated, min_tokens, _) in enumerate(RESTRICTED):
        restricted = reference_restrict(logits[row], ids, bias, stop, generated, min_tokens)
        assert np.isfinite(restricted[tokens[row]]).all(), row
    model_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(
        np.asarray(out.logprobs).reshape(len(RESTRICTED), n), np.take_along_axis(model_lp, tokens, axis=1), rtol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(out.top_ids)[::n], np.argsort(-logits, axis=-1)[:, :3])


def test_options_validate_and_normalize_logit_bias():
    from mimo_jax.engine.sampling import SamplingOptions

    assert SamplingOptions(logit_bias={"5": -100, 7: 2}).logit_bias == {5: -100.0, 7: 2.0}  # JSON keys are strings
    for bad, match in (({3: 101.0}, r"\[-100, 100\]"), ({"x": 1.0}, "token id"), ({-1: 1.0}, "token id")):
        with pytest.raises(ValueError, match=match):
            SamplingOptions(logit_bias=bad)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingOptions(min_tokens=5, max_new_tokens=4)
    with pytest.raises(ValueError, match="constraint"):
        SamplingOptions(constraint="json")
    assert SamplingOptions(max_new_tokens=4, min_tokens=4).params()["min_tokens"] == 4
