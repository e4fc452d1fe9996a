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
