"""The generation engine against full-sequence forwards, transformers' generate, and solo runs."""

import jax
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.engine.host import Engine, EngineFull
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.model.mimo import MiMoModel
from tests.fixtures import TINY, make_hf_model, save_hf_checkpoint

PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 38], [4, 6], [50, 1, 2, 3, 4, 5, 60, 61, 62]]


@pytest.fixture(scope="module")
def lm():
    cfg = MiMoConfig.from_dict(TINY)  # window 5 keys; layers full, SWA, SWA, full
    return mimo_jax.LanguageModel(MiMoModel(cfg, rngs=nnx.Rngs(3)))


@pytest.fixture(scope="module")
def engine(lm):
    """Three slots, prompts prefilled in chunks of 4 (shorter than a window and than the prompts)."""
    return Engine(lm, max_batch=3, max_context=64, prefill_chunk=4, max_round_tokens=8, max_top_logprobs=4)


@pytest.fixture(scope="module")
def solo_engine(lm):
    """The same settings with a single slot."""
    return Engine(lm, max_batch=1, max_context=64, prefill_chunk=4, max_round_tokens=8, max_top_logprobs=4)


def run_all(engine, requests, rounds=None):
    """requests: {id: (prompt, SamplingOptions)} added up front; returns {id: (tokens, reason)}."""
    for rid, (prompt, opts) in requests.items():
        engine.add(rid, prompt, opts)
    return drain(engine, {rid: [[], None] for rid in requests})


def drain(engine, out, add_later=()):
    """Step until every request finishes; `add_later`: (after_step, id, prompt, opts) joins mid-flight."""
    pending = sorted(add_later, key=lambda x: x[0])
    step = 0
    while engine.has_work() or pending:
        while pending and pending[0][0] <= step and engine.free_slots:
            _, rid, prompt, opts = pending.pop(0)
            engine.add(rid, prompt, opts)
            out[rid] = [[], None]
        for o in engine.step(max_tokens_per_round=3):
            out[o.request_id][0].extend(o.token_ids)
            if o.finished:
                out[o.request_id][1] = o.finish_reason
        step += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_decode_distributions_equal_full_forward(lm):
    """Teacher forcing: every step's full distribution equals the full forward's, over > 3 windows."""
    vocab = lm.config.vocab_size
    eng = Engine(lm, max_batch=2, max_context=48, prefill_chunk=8, max_round_tokens=16, max_top_logprobs=vocab)
    prompts = [PROMPTS[0] + PROMPTS[2], PROMPTS[1]]  # 24 tokens: chunks of 8 and 16... and a 2-token prompt
    results = mimo_jax.generate(
        lm, prompts, max_new_tokens=22, temperature=1.0, seed=5, logprobs=vocab, ignore_eos=True, engine=eng
    )
    for prompt, r in zip(prompts, results, strict=True):
        assert len(r.token_ids) == 22 and r.finish_reason == "length"
        seq = prompt + r.token_ids
        assert len(seq) > 3 * lm.config.window_keys
        ref = np.asarray(jax.nn.log_softmax(lm.logits(np.array([seq]))[0, len(prompt) - 1 : -1]))
        ours = np.full_like(ref, -np.inf)
        for t, top in enumerate(r.top_logprobs):
            for token, lp in top:
                ours[t, token] = lp
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.logprobs, ref[np.arange(22), r.token_ids], atol=1e-4)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    hf = make_hf_model(seed=7)
    directory = str(tmp_path_factory.mktemp("hf"))
    save_hf_checkpoint(hf, directory)
    return hf, directory


def test_greedy_matches_transformers_generate(hf_checkpoint):
    import torch

    hf, directory = hf_checkpoint
    ours = mimo_jax.load_model(directory)
    prompts = [[5, 17, 33, 2, 90, 41, 8], [60, 61]]
    results = mimo_jax.generate(ours, prompts, max_new_tokens=70, prefill_chunk=4)
    for prompt, r in zip(prompts, results, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False, min_new_tokens=70)
        assert r.token_ids == ref[0, len(prompt) :].tolist()
        assert r.finish_reason == "length"


def test_cli_prints_text_with_a_tokenizer(hf_checkpoint, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from mimo_jax.generate import main

    _, directory = hf_checkpoint
    words = [f"w{i}" for i in range(96)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with_tokenizer = tmp_path / "ckpt"
    shutil.copytree(directory, with_tokenizer)
    tokenizer.save(str(with_tokenizer / "tokenizer.json"))
    assert main(["--model", str(with_tokenizer), "--prompt", "w5 w17 w33", "--max-new-tokens", "6"]) == 0
    (want,) = mimo_jax.generate(mimo_jax.load_model(directory), [[5, 17, 33]], max_new_tokens=6)
    assert capsys.readouterr().out == "w5 w17 w33" + tokenizer.decode(want.token_ids) + "\n"
    main(["--model", directory, "--prompt", "5 17 33", "--max-new-tokens", "6"])  # no tokenizer: ids
    assert capsys.readouterr().out.split() == [str(t) for t in want.token_ids]


def test_mixed_batch_equals_solo(lm, engine, solo_engine):
    kwargs = dict(max_new_tokens=12, ignore_eos=True)
    for sampling in (dict(), dict(temperature=0.9, top_p=0.9, seed=[11, 12, 13])):
        batch = mimo_jax.generate(lm, PROMPTS, engine=engine, **kwargs, **sampling)
        for i, prompt in enumerate(PROMPTS):
            solo_sampling = dict(sampling, seed=[sampling["seed"][i]]) if "seed" in sampling else sampling
            (solo,) = mimo_jax.generate(lm, [prompt], engine=solo_engine, **kwargs, **solo_sampling)
            assert batch[i].token_ids == solo.token_ids


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def overlap(request, engine):
    """Run a test with the engine's `overlap` (a step reads the previous step's tokens) off and on."""
    engine.overlap = request.param
    yield request.param
    assert not engine.has_work()
    engine.overlap = False


def test_continuous_batching_equals_solo(engine, overlap):
    greedy = SamplingOptions(max_new_tokens=10)
    sampled = SamplingOptions(max_new_tokens=7, temperature=1.0, top_k=20, seed=4)
    solo = {
        "a": run_all(engine, {"a": (PROMPTS[0], greedy)})["a"],
        "b": run_all(engine, {"b": (PROMPTS[1], sampled)})["b"],
        "c": run_all(engine, {"c": (PROMPTS[2], greedy)})["c"],
        "d": run_all(engine, {"d": (PROMPTS[1], greedy)})["d"],
    }
    # a and b start together; c joins while they decode; d waits for a free slot (slot reuse).
    engine.add("a", PROMPTS[0], greedy)
    engine.add("b", PROMPTS[1], sampled)
    later = [(1, "c", PROMPTS[2], greedy), (2, "x", PROMPTS[2], sampled), (3, "d", PROMPTS[1], greedy)]
    # x is cancelled as soon as it runs, freeing its slot for d.
    out = {"a": [[], None], "b": [[], None]}
    pending = sorted(later)
    step = 0
    while engine.has_work() or pending:
        while pending and pending[0][0] <= step and engine.free_slots:
            _, rid, prompt, opts = pending.pop(0)
            engine.add(rid, prompt, opts)
            out[rid] = [[], None]
        for o in engine.step(max_tokens_per_round=2):
            out[o.request_id][0].extend(o.token_ids)
            if o.finished:
                out[o.request_id][1] = o.finish_reason
        if "x" in out and out["x"][1] is None and out["x"][0]:
            assert engine.cancel("x")
            out["x"][1] = "cancelled"
        step += 1
    for rid in "abcd":
        assert (out[rid][0], out[rid][1]) == solo[rid], rid
    assert out["x"][1] == "cancelled"
    assert not engine.cancel("x")


def test_first_token_comes_with_its_admission_step(engine, overlap):
    """With or without overlap, the step that admits a request returns its first token (time to first token
    never waits for a decode round); a request ended by its first token finishes in that step."""
    greedy = SamplingOptions(max_new_tokens=6)
    want = run_all(engine, {"w": (PROMPTS[2], greedy)})["w"]
    engine.add("r", PROMPTS[2], greedy)  # prompt of 9 tokens: three chunks of 4, then admission
    engine.add("one", PROMPTS[1], SamplingOptions(max_new_tokens=1))
    out = {"r": [[], None], "one": [[], None]}
    steps_to_first = None
    step = 0
    while engine.has_work():
        step += 1
        for o in engine.step(max_tokens_per_round=2, prefill_tokens=4):
            if o.request_id == "r" and not out["r"][0]:
                steps_to_first = step
            out[o.request_id][0].extend(o.token_ids)
            if o.finished:
                out[o.request_id][1] = o.finish_reason
    assert steps_to_first == 3  # chunks 0-3 and 4-7 in steps 1-2; the last token (and "one"'s prompt) in 3
    assert (out["r"][0], out["r"][1]) == want
    assert len(out["one"][0]) == 1 and out["one"][1] == "length"


def test_stop_tokens_and_length(engine):
    (tokens, reason) = run_all(engine, {"r": (PROMPTS[0], SamplingOptions(max_new_tokens=9))})["r"]
    assert len(tokens) == 9 and reason == "length"
    stop = tokens[4]
    first = tokens.index(stop)
    got = run_all(engine, {"s": (PROMPTS[0], SamplingOptions(max_new_tokens=9, stop_token_ids=(stop, 95)))})["s"]
    assert got == (tokens[: first + 1], "stop")
    # The context end also ends a request: 64 slots, a 60-token prompt leaves room for 4 tokens.
    long_prompt = (PROMPTS[0] * 4)[:60]
    got = run_all(engine, {"t": (long_prompt, SamplingOptions(max_new_tokens=30))})["t"]
    assert len(got[0]) == 4 and got[1] == "length"
    one = run_all(engine, {"u": (PROMPTS[1], SamplingOptions(max_new_tokens=1))})["u"]
    assert len(one[0]) == 1 and one[1] == "length"


def test_same_seed_same_sample(lm, engine):
    kwargs = dict(max_new_tokens=16, temperature=1.5, ignore_eos=True, engine=engine)
    a = mimo_jax.generate(lm, [PROMPTS[0], PROMPTS[0]], seed=[1, 2], **kwargs)
    b = mimo_jax.generate(lm, [PROMPTS[0], PROMPTS[2]], seed=[1, 3], **kwargs)
    assert a[0].token_ids == b[0].token_ids
    assert a[0].token_ids != a[1].token_ids


def test_bad_requests_are_rejected(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add("e", [], SamplingOptions())
    with pytest.raises(ValueError, match="token ids must lie"):
        engine.add("e", [1, 500], SamplingOptions())
    with pytest.raises(ValueError, match="no room"):
        engine.add("e", list(range(64)), SamplingOptions())
    with pytest.raises(ValueError, match="logprobs"):
        engine.add("e", [1], SamplingOptions(logprobs=9))
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    for i in range(3):
        engine.add(i, [1, 2], SamplingOptions(max_new_tokens=1))
    with pytest.raises(EngineFull):
        engine.add(3, [1, 2], SamplingOptions())
    with pytest.raises(ValueError, match="already running"):
        engine.add(1, [1], SamplingOptions())
    for i in range(3):
        assert engine.cancel(i)
    assert engine.free_slots == 3 and not engine.has_work()


def forward_scores(lm, prompt):
    """The full forward's log-softmax [P, V] over a prompt: row i is the distribution of token i + 1."""
    return np.asarray(jax.nn.log_softmax(lm.logits(np.array([prompt]))[0], axis=-1))


def assert_prompt_scores(lm, out, prompt, num_top):
    """A request's prompt scores against the full forward: token i's logprob (given tokens < i), rank, top-N."""
    ref = forward_scores(lm, prompt)
    n = len(prompt)
    assert len(out.prompt_logprobs) == len(out.prompt_ranks) == len(out.prompt_top_logprobs) == n
    assert out.prompt_logprobs[0] is None and out.prompt_ranks[0] is None and out.prompt_top_logprobs[0] is None
    want = ref[np.arange(n - 1), prompt[1:]]
    np.testing.assert_allclose(out.prompt_logprobs[1:], want, rtol=1e-5, atol=1e-5)
    assert out.prompt_ranks[1:] == [int(1 + (ref[i] > want[i]).sum()) for i in range(n - 1)]
    for i, top in enumerate(out.prompt_top_logprobs[1:]):
        order = np.argsort(-ref[i], kind="stable")[:num_top]
        assert [t for t, _ in top] == order.tolist()
        np.testing.assert_allclose([x for _, x in top], ref[i, order], rtol=1e-5, atol=1e-5)
        if out.prompt_ranks[i + 1] == 1:  # the token is the argmax: the same float (lm-eval's is_greedy)
            assert top[0][1] == out.prompt_logprobs[i + 1]


def test_prompt_logprobs_equal_full_forward(lm, engine, overlap):
    """Prompt scores over chunks of 4 (the last one padded) equal the full forward's log-softmax at the next
    prompt token; they come with the first output; the tokens are those of a request without them; max_new_tokens=0
    prefills only and finishes with "length" and no tokens."""
    long_prompt = (PROMPTS[0] + PROMPTS[2] + PROMPTS[0])[:37]  # 10 chunks, the last of 1 token
    plain = SamplingOptions(max_new_tokens=5)
    want = run_all(engine, {"a": (PROMPTS[0], plain), "b": (long_prompt, plain)})
    requests = {
        "a": (PROMPTS[0], SamplingOptions(max_new_tokens=5, prompt_logprobs=3)),
        "b": (long_prompt, SamplingOptions(max_new_tokens=5, prompt_logprobs=0, logprobs=2)),
        "c": (PROMPTS[2], SamplingOptions(max_new_tokens=0, prompt_logprobs=4)),
        "d": ([7], SamplingOptions(max_new_tokens=0, prompt_logprobs=1)),
    }
    later = ["d"]  # three slots: d takes the first one freed
    for rid in "abc":
        engine.add(rid, *requests[rid])
    outputs = {rid: [] for rid in requests}
    while engine.has_work() or later:
        if later and engine.free_slots:
            engine.add(later[0], *requests[later.pop()])
        for o in engine.step(max_tokens_per_round=2, prefill_tokens=8):
            outputs[o.request_id].append(o)
    for rid in "ab":
        first, *rest = outputs[rid]
        assert [t for o in outputs[rid] for t in o.token_ids] == want[rid][0]
        assert outputs[rid][-1].finish_reason == "length"
        assert all(o.prompt_logprobs is None for o in rest)
        prompt, opts = requests[rid]
        assert_prompt_scores(engine.lm, first, prompt, opts.prompt_logprobs)
    for rid in "cd":
        (only,) = outputs[rid]
        assert only.token_ids == [] and only.finished and only.finish_reason == "length"
        assert_prompt_scores(engine.lm, only, requests[rid][0], requests[rid][1].prompt_logprobs)
    assert outputs["d"][0].prompt_logprobs == [None]
    assert not run_all(engine, {"e": (PROMPTS[1], plain)})["e"][0] == []  # the slots are reusable


def test_prompt_logprobs_over_bucket_sizes(lm):
    """Chunks of 32 and a last one padded to the 16 bucket, and more than one window: the same scores."""
    eng = Engine(lm, max_batch=1, max_context=64, prefill_chunk=32, max_round_tokens=2, max_top_logprobs=2)
    prompt = (PROMPTS[0] * 4)[:45]
    eng.add("p", prompt, SamplingOptions(max_new_tokens=0, prompt_logprobs=2))
    (out,) = eng.step(prefill_tokens=64)
    assert out.finished and out.token_ids == []
    assert_prompt_scores(lm, out, prompt, 2)
    assert eng.prefill_logprobs_fn._cache_size() == 2 and eng.prefill_fn._cache_size() == 0
    with pytest.raises(ValueError, match="prompt_logprobs=3 exceeds"):
        eng.add("q", prompt, SamplingOptions(prompt_logprobs=3))
