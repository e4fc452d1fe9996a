"""MTP speculative decoding in the engine: the plain engine's greedy output, drafts equal to an uncached
chain, acceptance at its extremes (sampling: tests/engine/test_speculative_sampling.py).

Models: TINY (window of 5 keys; full, SWA, SWA, full layers) with 3 MTP layers, weights made so the
target mostly predicts succ(last token) (a fixed map) with context-dependent exceptions, and MTP
layers that mostly predict the same map: drafts are then accepted sometimes, not always.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.model.mimo import MiMoModel, with_draft_vocab
from tests.fixtures import TINY_CONFIG, predictable_model, successor

CFG = TINY_CONFIG
LONG = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 38]


@pytest.fixture(scope="module")
def lm():
    return mimo_jax.LanguageModel(predictable_model(noise=100.0, mtp_noise=300.0))


@pytest.fixture(scope="module")
def engines(lm):
    """engines(k): the module's 2-slot engine with k drafts (0: plain), built and compiled once."""
    built = {}

    def engine(k: int) -> Engine:
        if k not in built:
            built[k] = Engine(lm, max_batch=2, max_context=64, prefill_chunk=4, max_round_tokens=3, speculative_steps=k)
        assert not built[k].has_work()
        return built[k]

    return engine


def run(engine: Engine, requests: dict) -> dict:
    """{id: (prompt, options)} through 2 slots (later ones wait for a free slot) -> {id: outputs}."""
    out = {rid: dict(tokens=[], accepted=[], drafts=[], reason=None) for rid in requests}
    pending = list(requests.items())
    while pending or engine.has_work():
        while pending and engine.free_slots:
            rid, (prompt, options) = pending.pop(0)
            engine.add(rid, prompt, options)
        for o in engine.step(max_tokens_per_round=3):
            r = out[o.request_id]
            r["tokens"] += o.token_ids
            r["accepted"] += o.accepted
            r["drafts"] += o.drafts
            if o.finished:
                r["reason"] = o.finish_reason
    return out


_hidden_states = nnx.jit(MiMoModel.hidden_states)  # one jitted function: each call with the same shapes reuses it


@nnx.jit(static_argnums=1)
def _mtp_greedy(model: MiMoModel, j: int, tokens, hidden, positions, last, allowed):
    _, logits, _ = model.mtp_forward(j, tokens, hidden, positions)  # the full head's logits
    return jnp.argmax(jnp.where(allowed, logits[0, last], -jnp.inf))


def uncached_drafts(
    model: MiMoModel, seq: list[int], prompt_len: int, accepted: list[int], k: int, draft_vocab=None
) -> list:
    """Each round's greedy chain recomputed without any cache: MTP layer j over positions 0..P reads
    (h_i, t_{i+j+1}) with the final sequence's tokens up to t_{P+1} and the chain's own drafts after;
    each draft is the argmax over `draft_vocab` (token ids; None: the whole vocabulary)."""
    allowed = np.zeros(model.config.vocab_size, bool)
    allowed[slice(None) if draft_vocab is None else np.asarray(draft_vocab)] = True
    length = 64  # one shape for every sequence: positions past P are -1 (masked)
    positions = np.arange(length, dtype=np.int32)[None]
    padded = np.zeros((1, length), np.int32)
    padded[0, : len(seq)] = seq
    hidden, _ = _hidden_states(model, jnp.asarray(padded), jnp.asarray(positions))
    rounds, last = [], prompt_len - 1
    for a in accepted:
        drafts = []
        for j in range(k):
            ext = np.array(seq[: last + 2] + drafts, np.int32)
            tokens = np.zeros((1, length), np.int32)
            tokens[0, : last + 1] = ext[j + 1 : j + 2 + last]
            pos = np.where(positions <= last, positions, -1)
            drafts.append(int(_mtp_greedy(model, j, tokens, hidden, pos, last, allowed)))
        rounds.append(drafts)
        last += a + 1
    return rounds


@pytest.fixture(scope="module")
def requests(engines):
    """Mixed prompt lengths and options; the stop token and the context end cut an accepted run."""
    plain = engines(0)
    greedy = SamplingOptions(max_new_tokens=30)
    reqs = {
        "long": (LONG, greedy),
        "short": (LONG[:2], SamplingOptions(max_new_tokens=30, presence_penalty=0.7, repetition_penalty=1.5)),
        "mid": (LONG[5:14], greedy),
        "edge": ((LONG * 4)[:58], greedy),  # 6 positions left in max_context=64
    }
    first = run(plain, {"mid": reqs["mid"]})["mid"]["tokens"]
    reqs["stop"] = (LONG[5:14], SamplingOptions(max_new_tokens=30, stop_token_ids=(first[17],)))
    # sampled: shares rounds with greedy requests (a mixed batch takes the sampling path)
    reqs["hot"] = (LONG[3:9], SamplingOptions(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=3))
    want = run(plain, reqs)
    del want["hot"]["tokens"]  # another random stream: only its length is compared
    return reqs, want


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_and_drafts_equal_uncached_chain(lm, engines, requests, k):
    reqs, want = requests
    engine = engines(k)
    stats_ = engine.speculation
    before = (stats_.target_forwards, stats_.accepted_tokens, list(stats_.accepted_at))
    got = run(engine, reqs)
    for rid, w in want.items():
        g = got[rid]
        if rid == "hot":
            assert len(g["tokens"]) == 30 and g["reason"] == "length"
            continue
        assert (g["tokens"], g["reason"]) == (w["tokens"], w["reason"]), rid
        prompt = reqs[rid][0]
        assert len(g["accepted"]) == len(g["drafts"]) and all(len(d) == k for d in g["drafts"])
        assert sum(a + 1 for a in g["accepted"]) >= len(g["tokens"]) - 1  # stops may cut the last run
        if rid != "short":  # penalties would change the reference's argmax
            assert g["drafts"] == uncached_drafts(lm.model, prompt + g["tokens"], len(prompt), g["accepted"], k), rid
    assert len(LONG) + len(want["long"]["tokens"]) > 3 * CFG.window_keys
    assert want["edge"]["reason"] == "length" and len(want["edge"]["tokens"]) == 6
    accepted = np.concatenate([np.asarray(g["accepted"]) for g in got.values()])
    assert (accepted == 0).any() and (accepted == k).any()  # both rejections and full acceptance happened
    forwards, accepted_tokens = stats_.target_forwards - before[0], stats_.accepted_tokens - before[1]
    assert forwards == accepted.size and accepted_tokens == accepted.sum()
    assert [a - b for a, b in zip(stats_.accepted_at, before[2], strict=True)] == [
        int((accepted > j).sum()) for j in range(k)
    ]
    # (the engine is shared in the module: its counters are compared by their change, its mean over everything)
    assert stats_.mean_accept_length == pytest.approx(1 + stats_.accepted_tokens / stats_.target_forwards)


def test_draft_vocabulary_keeps_greedy_output_and_drafts_its_argmax(lm, requests):
    """Drafts over a reduced vocabulary (`with_draft_vocab`, FR-Spec) leaving out half of the successor map's
    targets: those drafts become other tokens (rejected), the output stays plain decoding's token for token,
    and each draft is the uncached chain's argmax over the draft vocabulary."""
    reqs, want = requests
    succ = successor(CFG.vocab_size)
    left_out = {int(succ[t]) for t in range(0, CFG.vocab_size, 2)}
    ids = np.random.RandomState(0).permutation([t for t in range(CFG.vocab_size) if t not in left_out])  # any order
    model = with_draft_vocab(lm.model, ids)
    engine = Engine(
        mimo_jax.LanguageModel(model),
        max_batch=2,
        max_context=64,
        prefill_chunk=4,
        max_round_tokens=3,
        speculative_steps=3,
    )
    got = run(engine, reqs)
    for rid in ("long", "mid", "edge", "stop"):
        g = got[rid]
        assert (g["tokens"], g["reason"]) == (want[rid]["tokens"], want[rid]["reason"]), rid
        prompt = reqs[rid][0]
        assert g["drafts"] == uncached_drafts(model, prompt + g["tokens"], len(prompt), g["accepted"], 3, ids), rid
        assert not left_out & {d for r in g["drafts"] for d in r}
    assert len(got["hot"]["tokens"]) == 30
    accepted = np.concatenate([np.asarray(g["accepted"]) for g in got.values()])
    assert (accepted == 0).any() and (accepted > 0).any()


@pytest.mark.parametrize(("k", "mtp_right"), [(3, True), (2, False)])
def test_acceptance_length_is_k_plus_1_or_1(k, mtp_right):
    model = predictable_model(noise=0.0, mtp_noise=0.0)  # target: exactly successor(last token)
    if not mtp_right:
        for m in model.mtp:  # all-zero draft logits: always token 0, which the target never picks
            m.final_layernorm.weight.set_value(jnp.zeros_like(m.final_layernorm.weight.get_value()))
    lm = mimo_jax.LanguageModel(model)
    prompts = [LONG, [7, 8]]
    results = mimo_jax.generate(lm, prompts, max_new_tokens=21, ignore_eos=True, speculative_steps=k, prefill_chunk=8)
    succ = successor(CFG.vocab_size)
    for prompt, r in zip(prompts, results, strict=True):
        chain = [int(succ[prompt[-1]])]
        while len(chain) < 21:
            chain.append(int(succ[chain[-1]]))
        assert r.token_ids == chain
        assert r.mean_accept_length == (k + 1 if mtp_right else 1)
        assert r.acceptance_rates == [1.0 if mtp_right else 0.0] * k
        assert len(r.accepted_per_forward) == (-(-20 // (k + 1)) if mtp_right else 20)


def test_speculative_steps_must_fit_the_mtp_layers(lm):
    with pytest.raises(ValueError, match="speculative_steps=4"):
        Engine(lm, speculative_steps=4)
    plain = mimo_jax.LanguageModel(MiMoModel(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="mtp=True"):
        Engine(plain, speculative_steps=1)
    engine = Engine(lm, max_batch=1, max_context=16, speculative_steps=1)
    with pytest.raises(ValueError, match="the engine has 1"):
        mimo_jax.generate(lm, [[1, 2]], max_new_tokens=2, engine=engine)


def test_logit_bias_and_min_tokens_with_speculation(engines):
    """Greedy output with logit_bias and min_tokens equals the plain engine's (drafts and verify rows apply the
    same bias and ban, counting the drafts before them); sampled requests keep the bias's ban and min_tokens
    (constrained requests with speculation: tests/engine/test_constraints_speculative.py)."""
    plain = engines(0)
    first = run(plain, {"p": (LONG, SamplingOptions(max_new_tokens=12))})["p"]["tokens"]
    stop = first[8]
    reqs = {
        "ban": (LONG, SamplingOptions(max_new_tokens=20, logit_bias={first[2]: -100, first[5]: -3.0, 17: 2.0})),
        "min": (
            LONG[5:14],
            SamplingOptions(max_new_tokens=20, logit_bias={stop: 100}, stop_token_ids=(stop,), min_tokens=6),
        ),
        "hot": (LONG[3:9], SamplingOptions(max_new_tokens=20, temperature=1.0, seed=4, logit_bias={first[2]: -100})),
        "hot_min": (
            LONG[:4],
            SamplingOptions(
                max_new_tokens=20, temperature=1.0, seed=5, logit_bias={stop: 100}, stop_token_ids=(stop,), min_tokens=7
            ),
        ),
    }
    want = run(plain, reqs)
    engine = engines(2)
    got = run(engine, reqs)
    for rid in ("ban", "min"):
        assert (got[rid]["tokens"], got[rid]["reason"]) == (want[rid]["tokens"], want[rid]["reason"]), rid
    assert got["ban"]["tokens"] != run(plain, {"p": (LONG, SamplingOptions(max_new_tokens=20))})["p"]["tokens"]
    assert got["min"]["tokens"][6:] == [stop] and stop not in got["min"]["tokens"][:6]
    assert first[2] not in got["hot"]["tokens"] and len(got["hot"]["tokens"]) == 20
    assert got["hot_min"]["tokens"][7:] == [stop] and got["hot_min"]["reason"] == "stop"
    assert any(a > 0 for a in got["ban"]["accepted"] + got["min"]["accepted"])  # drafts were accepted
    assert not engine.has_work()


def test_prompt_logprobs_with_speculation(lm, engines):
    """The scoring prefill feeds the MTP layers as the plain one does (same tokens and drafts) and scores the
    prompt as the full forward does."""
    import jax

    engine = engines(2)
    plain, scored = SamplingOptions(max_new_tokens=12), SamplingOptions(max_new_tokens=12, prompt_logprobs=0)
    want = run(engine, {"a": (LONG, plain)})["a"]
    engine.add("b", LONG, scored)
    outputs = []
    while engine.has_work():
        outputs += engine.step(max_tokens_per_round=3)
    assert [t for o in outputs for t in o.token_ids] == want["tokens"]
    assert [d for o in outputs for d in o.drafts] == want["drafts"]
    ref = np.asarray(jax.nn.log_softmax(lm.logits(np.array([LONG]))[0], axis=-1))
    assert outputs[0].prompt_logprobs[0] is None
    np.testing.assert_allclose(outputs[0].prompt_logprobs[1:], ref[np.arange(len(LONG) - 1), LONG[1:]], atol=1e-4)
