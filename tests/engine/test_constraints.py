"""Token masks (constrained decoding), logit_bias and min_tokens in the engine, against full-sequence forwards.

Fake constraints stand in for a grammar backend: only even token ids, a fixed script of tokens then
finished, or a dead end that allows nothing after a few tokens; one test runs the demo model with its tokenizer's
grammar (llguidance, a JSON schema).
"""

import json

import jax
import jsonschema
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.engine.constraints import allowed_tokens, bitmask_of, bitmask_words
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.model.mimo import MiMoModel
from tests.fixtures import BUILT_CONSTRAINTS as BUILT
from tests.fixtures import TINY, next_token_logits
from tests.fixtures import fake_constraint as factory
from tests.fixtures import run_by_step as run

VOCAB = TINY["vocab_size"]
CONTEXT = 48
PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7], [4, 6], [50, 1, 2, 3, 4, 5, 60, 61, 62], [20, 21, 22]]


@pytest.fixture(scope="module")
def lm():
    return mimo_jax.LanguageModel(MiMoModel(MiMoConfig.from_dict(TINY), rngs=nnx.Rngs(3)))


@pytest.fixture(scope="module")
def engine(lm):
    return Engine(
        lm,
        max_batch=4,
        max_context=CONTEXT,
        prefill_chunk=4,
        max_round_tokens=4,
        max_top_logprobs=3,
        max_logit_bias=3,
        constraint_factory=factory,
    )


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def overlap(request, engine):
    engine.overlap = request.param
    yield request.param
    assert not engine.has_work()
    engine.overlap = False


def test_bitmask_helpers():
    assert bitmask_words(64) == 2 and bitmask_words(65) == 3
    mask = bitmask_of([0, 31, 32, 40], VOCAB)
    assert mask.dtype == np.int32 and mask[0] == np.int32(-(2**31) + 1) and mask[1] == 1 + (1 << 8)
    assert np.flatnonzero(allowed_tokens(mask, VOCAB)).tolist() == [0, 31, 32, 40]


def test_constrained_and_free_requests_share_a_batch(lm, engine, overlap):
    """Greedy constrained output is the argmax of the masked full-forward logits, reported logprobs stay the
    model's; a sampled constrained request only emits allowed tokens; the unconstrained requests in the same
    batch give what they give alone, in rounds of their usual length; a script ends its request ("stop");
    nothing recompiles."""
    free = SamplingOptions(max_new_tokens=30)
    hot = SamplingOptions(max_new_tokens=30, temperature=1.0, seed=7)
    alone = {
        rid: run(engine, {rid: r})[rid] for rid, r in {"free": (PROMPTS[2], free), "hot": (PROMPTS[3], hot)}.items()
    }
    even = SamplingOptions(max_new_tokens=10, logprobs=3, constraint={"type": "even", "name": "even"})
    even_hot = SamplingOptions(max_new_tokens=10, temperature=1.0, seed=3, constraint={"type": "even", "name": "hot"})
    script = SamplingOptions(max_new_tokens=10, constraint={"type": "script", "tokens": [5, 9, 9, 1], "name": "s"})
    # the free ones decode (overlapped, when on) before the constrained ones join, and after they leave
    got = run(
        engine,
        {"free": (PROMPTS[2], free), "hot": (PROMPTS[3], hot)},
        add_later=[
            (1, "even", PROMPTS[0], even),
            (1, "script", PROMPTS[1], script),
            (2, "even_hot", PROMPTS[1], even_hot),
        ],
    )
    for rid in ("free", "hot"):
        assert (got[rid]["tokens"], got[rid]["reason"]) == (alone[rid]["tokens"], "length"), rid
        assert got[rid]["steps"] & got["even"]["steps"] and got[rid]["steps"] & got["even_hot"]["steps"]
        assert len(got[rid]["steps"]) <= 30 // 3 + 2  # rounds of 3 tokens also while constrained ones run
    assert (got["script"]["tokens"], got["script"]["reason"]) == ([5, 9, 9, 1], "stop")
    for rid, name in (("even", "even"), ("even_hot", "hot")):
        tokens = got[rid]["tokens"]
        assert len(tokens) == 10 and got[rid]["reason"] == "length" and all(t % 2 == 0 for t in tokens), tokens
        assert BUILT[name].accepted == tokens
    tokens = got["even"]["tokens"]
    logits = next_token_logits(lm, PROMPTS[0], tokens)
    masked = np.where(np.arange(VOCAB) % 2 == 0, logits, -np.inf)
    assert tokens == masked.argmax(axis=-1).tolist()
    assert (logits.argmax(axis=-1) % 2).any()  # the mask changed something
    model_lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(got["even"]["logprobs"], model_lp[np.arange(10), tokens], atol=1e-4)
    assert [[i for i, _ in top] for top in got["even"]["top"]] == np.argsort(-logits, axis=-1)[:, :3].tolist()
    assert all(r["outputs"] == len(r["steps"]) for r in got.values())  # one StepOutput per request per step
    assert engine.admit_fn._cache_size() == 1
    assert engine.decode_fn._cache_size() <= len(engine.steps.decode_buckets)  # one program per round size


def test_a_constraint_ends_its_request(engine, overlap):
    """A script ended by its first token, a mask empty from the start (no token at all) and one empty after
    three tokens: each request stops ("stop") and frees its slot."""
    got = run(
        engine,
        {
            "one": (PROMPTS[1], SamplingOptions(max_new_tokens=5, constraint={"type": "script", "tokens": [8]})),
            "none": (
                PROMPTS[0],
                SamplingOptions(max_new_tokens=5, logprobs=1, constraint={"type": "dead_end", "after": 0}),
            ),
            "three": (PROMPTS[2], SamplingOptions(max_new_tokens=5, constraint={"type": "dead_end", "after": 3})),
        },
    )
    assert (got["one"]["tokens"], got["one"]["reason"]) == ([8], "stop")
    assert (got["none"]["tokens"], got["none"]["reason"]) == ([], "stop")
    assert len(got["three"]["tokens"]) == 3 and got["three"]["reason"] == "stop"
    assert engine.free_slots == engine.max_batch


def test_constraint_errors(lm, engine):
    with pytest.raises(ValueError, match="'bad'.*could not be built.*unknown constraint type"):
        engine.add("bad", [1, 2], SamplingOptions(constraint={"type": "regex"}))
    assert engine.free_slots == engine.max_batch and not engine.has_work()
    plain = Engine(lm, max_batch=1, max_context=16)
    with pytest.raises(ValueError, match="no constraint_factory"):
        plain.add("c", [1, 2], SamplingOptions(constraint={"type": "even"}))
    with pytest.raises(ValueError, match="max_logit_bias=3"):
        engine.add("b", [1], SamplingOptions(logit_bias={1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.add("b", [1], SamplingOptions(logit_bias={VOCAB: 1.0}))
    assert not engine.has_work()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_and_min_tokens(lm, engine, temperature):
    """-100 bans the token the model would pick, +100 forces one; with min_tokens a stop token that +100
    makes certain comes right after min_tokens tokens, never before."""
    opts = dict(max_new_tokens=8, temperature=temperature, seed=5)
    base = run(engine, {"base": (PROMPTS[0], SamplingOptions(**opts))})["base"]["tokens"]
    banned = base[0]
    stop = next(t for t in range(VOCAB) if t not in base)
    got = run(
        engine,
        {
            "ban": (PROMPTS[0], SamplingOptions(**opts, logit_bias={banned: -100})),
            "force": (PROMPTS[1], SamplingOptions(**opts, logit_bias={"11": 100})),
            "min": (PROMPTS[2], SamplingOptions(**opts, logit_bias={stop: 100}, stop_token_ids=(stop,), min_tokens=4)),
            "min0": (PROMPTS[2], SamplingOptions(**opts, logit_bias={stop: 100}, stop_token_ids=(stop,))),
        },
    )
    assert got["force"]["tokens"] == [11] * 8
    assert (
        got["min"]["tokens"][4:] == [stop] and stop not in got["min"]["tokens"][:4] and got["min"]["reason"] == "stop"
    )
    assert got["min0"]["tokens"] == [stop] and got["min0"]["reason"] == "stop"
    ban = got["ban"]["tokens"]
    assert banned not in ban and len(ban) == 8
    if temperature == 0:
        logits = next_token_logits(lm, PROMPTS[0], ban)
        logits[:, banned] -= 100
        assert ban == logits.argmax(axis=-1).tolist()
        before_stop = got["min"]["tokens"][:4]
        logits = next_token_logits(lm, PROMPTS[2], before_stop)
        logits[:, stop] = -np.inf
        assert before_stop == logits.argmax(axis=-1).tolist()


@pytest.mark.parametrize("num_pages", [None, 14], ids=["roomy", "tight"])
def test_constrained_beside_free_equals_alone(lm, num_pages):
    """Constrained and free requests (greedy and seeded) in one engine with overlap on, some added while the
    others decode: each gives exactly what it gives alone. In a pool too small for all of them, requests are
    preempted and recomputed during constrained steps, with the same result. In a step where both kinds decode,
    one iteration over both is launched, then the free rows' other three iterations, both before the previous
    free launch is read (it stays in flight, as in plain steps), then the joined iteration is read."""
    eng = Engine(
        lm,
        max_batch=4,
        max_context=CONTEXT,
        prefill_chunk=4,
        max_round_tokens=4,
        page_size=4,
        num_pages=num_pages,
        constraint_factory=factory,
    )
    eng.overlap = True
    free = SamplingOptions(max_new_tokens=14)
    free_hot = SamplingOptions(max_new_tokens=9, temperature=1.0, seed=21)
    even = SamplingOptions(max_new_tokens=12, constraint={"type": "even"})
    even_hot = SamplingOptions(max_new_tokens=12, temperature=1.0, seed=5, constraint={"type": "even"})
    start = {"free": (PROMPTS[2], free), "even_hot": (PROMPTS[1], even_hot), "free_hot": (PROMPTS[3], free_hot)}
    later = [(2, "even", PROMPTS[0], even), (3, "free2", PROMPTS[0], free)]
    requests = {**start, **{rid: (p, o) for _, rid, p, o in later}}
    alone = {rid: run(eng, {rid: r}, round_tokens=4)[rid] for rid, r in requests.items()}

    events = []  # (what, kind of the round) in call order, per step
    decode, collect = eng._decode, eng._collect
    eng._decode = lambda running, n, *a: events.append(("launch", _kind(running), n)) or decode(running, n, *a)
    eng._collect = lambda work: events.append(("read", _kind(work))) or collect(work)
    step = eng.step
    steps = []
    eng.step = lambda *a, **kw: (events.clear(), step(*a, **kw), steps.append(list(events)))[1]
    try:
        got = run(eng, start, add_later=later, round_tokens=4)
    finally:
        del eng._decode, eng._collect, eng.step
    assert not eng.has_work() and eng.pages.stats().used == 0
    for rid in requests:
        assert (got[rid]["tokens"], got[rid]["reason"]) == (alone[rid]["tokens"], alone[rid]["reason"]), rid
    assert all(t % 2 == 0 for rid in ("even", "even_hot") for t in got[rid]["tokens"])
    shared = lambda a, b: got[a]["steps"] & got[b]["steps"]
    assert shared("free_hot", "even_hot") and shared("free2", "even")
    if num_pages is None:
        assert shared("free", "even_hot") and shared("free", "even")
    else:
        assert eng.num_preemptions > 0
    overlapped = [("launch", "joined", 1), ("launch", "free", 3), ("read", "free"), ("read", "joined")]
    assert sum(s == overlapped for s in steps) >= 3, steps


def test_free_rows_end_or_leave_beside_a_constrained_one(engine, overlap):
    """Free requests that end (length or a stop token) in the iteration they share with a constrained request,
    or after it, and one cancelled while its launches are in flight: each gives what it gives alone (tokens,
    logprobs and top logprobs), the requests that take the freed slots too, and the constrained one its
    masked argmax."""
    lp = dict(logprobs=2)
    long_free = SamplingOptions(max_new_tokens=12, **lp)
    alone = run(engine, {"long": (PROMPTS[2], long_free)})["long"]
    stop_at = next(i for i in range(4, 7) if alone["tokens"][i] not in alone["tokens"][:i])
    stop = SamplingOptions(max_new_tokens=12, stop_token_ids=(alone["tokens"][stop_at],), **lp)
    free = {f"len{n}": (PROMPTS[2], SamplingOptions(max_new_tokens=n, **lp)) for n in (5, 6, 7)}  # every residue
    even = SamplingOptions(max_new_tokens=14, constraint={"type": "even"})
    later = [(1, rid, p, o) for rid, (p, o) in free.items()]
    later += [(2, "stop", PROMPTS[2], stop), (2, "hot", PROMPTS[3], SamplingOptions(max_new_tokens=9, seed=4, **lp))]
    ended_in = {}  # request -> the kind of launch whose read ended it
    collect = engine._collect

    def recording_collect(work):
        outputs = collect(work)
        ended_in.update((o.request_id, _kind(work)) for o in outputs if o.finished)
        return outputs

    engine._collect = recording_collect
    try:
        got = run(engine, {"even": (PROMPTS[1], even)}, add_later=later)
    finally:
        del engine._collect
    hot_alone = run(engine, {"hot": (PROMPTS[3], later[-1][3])})["hot"]
    for rid, expected in [(f"len{n}", alone["tokens"][:n]) for n in (5, 6, 7)] + [
        ("stop", alone["tokens"][: stop_at + 1]),
        ("hot", hot_alone["tokens"]),
    ]:
        reference = hot_alone if rid == "hot" else alone
        n = len(expected)
        assert got[rid]["tokens"] == expected, rid
        assert got[rid]["reason"] == ("stop" if rid == "stop" else "length"), rid
        np.testing.assert_allclose(got[rid]["logprobs"], reference["logprobs"][:n], atol=1e-5)
        assert [[i for i, _ in t] for t in got[rid]["top"]] == [[i for i, _ in t] for t in reference["top"][:n]]
    assert any(ended_in[rid] == "joined" for rid in free), ended_in  # ended in the shared iteration
    logits = next_token_logits(engine.lm, PROMPTS[1], got["even"]["tokens"])
    masked = np.where(np.arange(VOCAB) % 2 == 0, logits, -np.inf)
    assert len(got["even"]["tokens"]) == 14 and got["even"]["tokens"] == masked.argmax(axis=-1).tolist()

    # cancelled once it decodes beside the constrained one (its launches in flight with overlap); a request
    # takes its slot
    engine.add("even", PROMPTS[1], even)
    engine.add("victim", PROMPTS[2], long_free)
    tokens = {"even": [], "victim": [], "next": []}
    cancelled = False
    while engine.has_work():
        if not cancelled and len(tokens["victim"]) >= 2:
            cancelled = engine.cancel("victim")
            engine.add("next", PROMPTS[3], later[-1][3])
        for o in engine.step(max_tokens_per_round=3):
            tokens[o.request_id] += o.token_ids
    assert tokens["even"] == got["even"]["tokens"] and tokens["next"] == hot_alone["tokens"]
    assert 0 < len(tokens["victim"]) < 12 and tokens["victim"] == alone["tokens"][: len(tokens["victim"])]
    assert engine.free_slots == engine.max_batch


JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 4},
    },
    "required": ["name", "n", "tags"],
}


def test_json_schema_beside_free_requests_on_the_demo():
    """The demo model with its tokenizer's grammar (llguidance): JSON-schema requests (greedy and seeded) beside
    free ones (greedy and seeded), overlap off and on, rounds of 4: the free ones give what they give alone (tokens;
    logprobs within float noise), the constrained ones what they give alone (one row in the launches they share
    when they run alone), and their text is JSON valid for the schema."""
    from mimo_jax.grammar import GrammarFactory
    from mimo_jax.text import Tokenizer
    from mimo_jax.weights.demo import demo_model_dir

    lm = mimo_jax.load_model(str(demo_model_dir()), dtype="float32")
    tokenizer = Tokenizer(str(demo_model_dir()))
    eng = Engine(
        lm,
        max_batch=4,
        max_context=128,
        prefill_chunk=32,
        max_round_tokens=4,
        max_top_logprobs=2,
        constraint_factory=GrammarFactory(tokenizer, lm.config.vocab_size),
    )
    rng = np.random.RandomState(0)
    prompts = [rng.randint(10, 5000, n).tolist() for n in (20, 9, 33, 14)]
    spec = {"json_schema": JSON_SCHEMA}
    requests = {
        "json_hot": (prompts[0], SamplingOptions(max_new_tokens=60, temperature=1.0, seed=11, constraint=spec)),
        "free": (prompts[1], SamplingOptions(max_new_tokens=40, logprobs=2)),
        "free_hot": (prompts[2], SamplingOptions(max_new_tokens=40, temperature=0.8, seed=3, logprobs=2)),
        "json": (prompts[3], SamplingOptions(max_new_tokens=60, logprobs=2, constraint=spec)),
    }
    alone = {rid: run(eng, {rid: r}, round_tokens=4)[rid] for rid, r in requests.items()}
    for rid in ("json", "json_hot"):
        assert alone[rid]["reason"] == "stop" and len(alone[rid]["tokens"]) > 20  # beside every free step
        jsonschema.validate(json.loads(tokenizer.decode(alone[rid]["tokens"])), JSON_SCHEMA)
    for overlap in (False, True):
        eng.overlap = overlap
        got = run(eng, requests, round_tokens=4)
        for rid in requests:
            assert (got[rid]["tokens"], got[rid]["reason"]) == (alone[rid]["tokens"], alone[rid]["reason"]), rid
            np.testing.assert_allclose(got[rid]["logprobs"], alone[rid]["logprobs"], atol=1e-4)
        assert got["free"]["steps"] & got["json"]["steps"] and got["free_hot"]["steps"] & got["json_hot"]["steps"]
    eng.overlap = False


def _kind(work) -> str:
    """'constrained', 'free' or 'joined' (both): the requests of a round about to launch or being read
    ('admitted': first tokens)."""
    if isinstance(work, list):
        reqs = work
    elif work.round_out is None:
        return "admitted"
    else:
        reqs = [work.slots[slot] for slot in work.rows if work.slots[slot] is not None]
    kinds = {r.constraint is not None for r in reqs}
    return "joined" if len(kinds) == 2 else "constrained" if True in kinds else "free"
