"""Speculative sampling keeps the target's distribution exactly: the accept rule on fixed rows, and the
engine's emitted tokens against the exact distribution computed by enumeration."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import mimo_jax
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions, SamplingParams, processed_logprobs
from mimo_jax.engine.speculative import accept_drafts
from tests.fixtures import TINY_CONFIG, predictable_model


def test_accept_drafts_output_is_distributed_as_the_target():
    """One verify with fixed target rows p_0, p_1 and draft rows q_0, q_1: the first emitted token
    follows p_0, the second (when the first draft was accepted) follows p_1."""
    n, vocab = 200_000, 5
    p = np.array([[0.5, 0.2, 0.1, 0.2, 0.0], [0.05, 0.05, 0.6, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = np.array([[0.1, 0.1, 0.3, 0.3, 0.2], [0.3, 0.0, 0.2, 0.1, 0.4]])
    rng = jax.random.key_data(jax.random.split(jax.random.key(0), n))
    drafts = jnp.stack([jax.random.categorical(jax.random.key(i + 1), jnp.log(q[i]), shape=(n,)) for i in range(2)], 1)
    tile = lambda a: jnp.broadcast_to(jnp.log(jnp.asarray(a, jnp.float32)), (n,) + a.shape)
    accepted, tokens = jax.jit(accept_drafts)(tile(p), tile(q), drafts.astype(jnp.int32), rng, jnp.zeros(n, jnp.int32))
    accepted, tokens = np.asarray(accepted), np.asarray(tokens)
    first = np.bincount(tokens[:, 0], minlength=vocab) / n
    np.testing.assert_allclose(first, p[0], atol=4e-3)
    second = tokens[accepted >= 1, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=vocab) / second.size, p[1], atol=6e-3)
    # acceptance rate of draft 0 is sum(min(p0, q0))
    np.testing.assert_allclose((accepted >= 1).mean(), np.minimum(p[0], q[0]).sum(), atol=4e-3)


def test_sampled_tokens_follow_the_exact_target_distribution():
    """Many copies of one request after its first token, each with its own random stream, decode two
    speculative rounds (k=2); the joint distribution of the next two tokens is the target's, computed by
    enumeration with the same sampling processing (temperature, top-k, penalties counting the tokens, logit_bias,
    and min_tokens=2 banning the stop token 4 for g2 but not for g3: each verify row and draft counts the tokens
    before it).
    Chi-square over the V^2 = 64 outcomes (the least likely pooled to an expected count >= 5), p-value > 1e-3,
    and total variation < 0.03."""
    vocab, n, k = 8, 16384, 2
    model = predictable_model(noise=100.0, mtp_noise=300.0, seed=1, cfg=TINY_CONFIG.replace(vocab_size=vocab))
    model.lm_head.set_value(model.lm_head.get_value() * 0.5)  # spread the distributions over most tokens
    lm = mimo_jax.LanguageModel(model)
    options = SamplingOptions(
        temperature=0.8,
        top_k=6,
        presence_penalty=0.4,
        repetition_penalty=1.3,
        logit_bias={3: 1.0, 6: -0.7},
        stop_token_ids=(4,),
        min_tokens=2,
    )
    engine = Engine(lm, max_batch=n, max_context=12, prefill_chunk=8, max_round_tokens=2, speculative_steps=k)
    prompt = np.array([1, 5, 2, 7], np.int32)

    # prefill and admit slot 0 through the engine's own jitted functions
    tokens = engine.prefill_tokens(prompt, 0, prompt.size, 8)
    m = engine.steps.max_pages  # slot r's pages: r*m .. (r+1)*m - 1 (the default pool holds n*m)
    tables = np.arange(n * m, dtype=np.int32).reshape(n, m)
    history = jnp.asarray(engine.empty_history())
    engine.cache, history, _ = engine.prefill_fn(
        engine.params, engine.cache, 0, tables[0], tokens, 0, prompt.size, history, jnp.int32(-1)
    )
    mask = np.zeros(vocab, bool)
    mask[prompt] = True
    request = engine.slot_request(prompt, options, seed=0)
    allow_all = engine.steps.allow_all()
    engine.state, first, _ = engine.admit_fn(engine.params, engine.state, 0, history, request, allow_all)
    g1 = int(first.tokens[0])

    # copy slot 0 into every slot, each with its own key
    row0 = lambda x: jnp.broadcast_to(x[:1], x.shape)
    engine.cache.rings = [jax.tree.map(row0, ring) for ring in engine.cache.rings]
    pages0 = lambda x: jnp.tile(x[:m], (n,) + (1,) * (x.ndim - 1))  # slot 0's pages copied to every slot's
    engine.cache.pools = [jax.tree.map(pages0, pool) for pool in engine.cache.pools]
    engine.state = jax.tree.map(row0, engine.state)
    engine.state.rng = jax.random.key_data(jax.random.split(jax.random.key(1), n))
    rows = np.arange(n, dtype=np.int32)
    args = (engine.params, engine.cache, engine.state, rows, tables, 2, engine.steps.allow_all(n))
    engine.cache, engine.state, out = engine.decode_fn(*args)
    out = jax.device_get(out)
    assert (out.count >= 2).all()
    accepted = out.accepted[:, 0]
    assert 0.2 < (accepted > 0).mean() < 0.8  # drafts both accepted and rejected
    observed = np.bincount(out.tokens[:, 0] * vocab + out.tokens[:, 1], minlength=vocab**2)

    # the exact joint distribution of (g2, g3) after prompt + [g1]
    params = SamplingParams.make(vocab, **options.params())
    prefix = list(prompt) + [g1]
    masks = jnp.broadcast_to(jnp.asarray(mask), (vocab, vocab))
    stops = jnp.full((vocab, 1), 4, jnp.int32)
    counts1 = np.zeros((vocab, vocab), np.int32)
    counts1[:, g1] += 1
    lp2 = processed_logprobs(
        jnp.asarray(lm.logits([prefix] * vocab)[:, -1]), params, jnp.asarray(counts1), masks, stops
    )[0]
    counts2 = counts1.copy()
    counts2[np.arange(vocab), np.arange(vocab)] += 1
    logits3 = lm.logits([prefix + [g2] for g2 in range(vocab)])[:, -1]
    lp3 = processed_logprobs(jnp.asarray(logits3), params, jnp.asarray(counts2), masks, stops)
    exact = (np.exp(np.asarray(lp2, np.float64))[:, None] * np.exp(np.asarray(lp3, np.float64))).reshape(-1)
    assert abs(exact.sum() - 1) < 1e-5 and observed[exact == 0].sum() == 0
    assert exact.reshape(vocab, vocab)[4].sum() == 0 and exact.reshape(vocab, vocab)[:, 4].sum() > 0.01  # min_tokens
    exact /= exact.sum()
    # bins with expected count < 5 pooled into one (merged into the smallest other bin while it is < 5 itself)
    order = np.argsort(exact)
    pool = np.cumsum(exact[order]) * n < 5
    pool[np.argmin(pool)] = True  # the smallest bin above the pool joins it
    f_obs = np.append(observed[order][~pool], observed[order][pool].sum())
    f_exp = np.append(exact[order][~pool], exact[order][pool].sum()) * n
    chi2 = stats.chisquare(f_obs, f_exp)
    assert chi2.pvalue > 1e-3, (chi2, f_exp.size)
    assert 0.5 * np.abs(observed / n - exact).sum() < 0.03, "total variation"
