"""The demo training script: corpus/tokenizer preparation, the jitted train step, MTP acceptance maths."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch import train_demo as td
from mimo_jax.config import MiMoConfig

TINY = td.PRESETS["tiny"]


def tiny_model(seed: int = 0, preset: td.Preset = TINY) -> td.MiMoModel:
    cfg = MiMoConfig.from_dict(td.hub_config(preset))
    return td.build_model(cfg, seed, preset.mtp_layers)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    manifest = td.prepare(out, TINY, seed=0, include="json/")
    return out, manifest


def test_prepare_is_deterministic_and_splits_by_file(tiny_data, tmp_path):
    out, manifest = tiny_data
    again = td.prepare(tmp_path, TINY, seed=0, include="json/")
    for key in ("train_sha256", "heldout_sha256", "tokenizer_sha256"):
        assert again[key] == manifest[key], key
    train = np.load(out / "train.npy")
    assert train.max() < TINY.vocab_size and manifest["train_tokens"] == train.size
    assert manifest["chat_samples"] == sum(manifest["chat_kinds"].values()) > 0
    assert manifest["heldout_chat_probes"] == len((out / "heldout_chat.jsonl").read_text().splitlines())
    # The split depends on the path only, and roughly 2% of the stdlib is held out.
    files = [rel for rel, _ in td.stdlib_files(td.stdlib_dir())]
    held = [rel for rel in files if td.is_heldout(rel)]
    assert 0.01 < len(held) / len(files) < 0.04


def test_tokenizer_special_tokens_and_roundtrip(tiny_data):
    from tokenizers import Tokenizer

    out, _ = tiny_data
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in td.SPECIAL_TOKENS] == [0, 1, 2]
    text = "def f(x):\n    return x  # ünïcode\n<think>\nhm\n</think>\n\n<tool_call>\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    for markup in td.MARKUP_TOKENS:
        assert tok.encode(markup, add_special_tokens=False).ids == [tok.token_to_id(markup)]


PREFILL = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the generation prompt with thinking disabled
ANSWERS = ("Here is `f`:\n\n```python", "`json.dumps` is defined in the `json` module.", "def f(x):\n    return x")


def _split_apart(tok, prefix: str, text: str) -> bool:
    ids = tok.encode(prefix + text, add_special_tokens=False).ids
    return ids == tok.encode(prefix, add_special_tokens=False).ids + tok.encode(text, add_special_tokens=False).ids


def test_prefilled_think_block_tokenizes_apart_from_the_answer(tiny_data):
    """Qwen2's split: the pre-filled `</think>\n\n` and what the model writes after it tokenize as in training,
    the concatenation of their parts (GPT-2's split, the v1 demo's, joins the newlines with the answer)."""
    from tokenizers import Tokenizer, pre_tokenizers

    out, _ = tiny_data
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for answer in ANSWERS:
        assert _split_apart(tok, PREFILL, answer), answer
    # Markup stays whole wherever it sits in the text.
    ids = tok.encode("x</think>y<tool_call>\n", add_special_tokens=False).ids
    assert tok.token_to_id("</think>") in ids and tok.token_to_id("<tool_call>") in ids
    # The same vocabulary and merges with GPT-2's split instead: "\n\n" + answer is cut "\n", "\n", answer.
    assert "ĊĊ" in tok.get_vocab()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    assert not any(_split_apart(tok, PREFILL, answer) for answer in ANSWERS)


def test_chat_template_thinking_and_tool_calls(tiny_data):
    from transformers import AutoTokenizer

    out, _ = tiny_data
    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "hi"}]
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    call = {"name": "read_source", "arguments": {"qualified_name": "json.dumps", "limit": 3}}
    convo = messages + [
        {"role": "assistant", "content": "", "reasoning_content": "look it up", "tool_calls": [{"function": call}]},
        {"role": "tool", "content": "def dumps(obj): ..."},
    ]
    text = tok.apply_chat_template(convo, tools=[td.READ_SOURCE_TOOL], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and '"name": "read_source"' in text
    assert "<|im_start|>assistant\n<think>\nlook it up\n</think>\n\n<tool_call>\n" in text
    # The tool-call block parses with MiMo's detector expressions (sglang-jax mimo_detector.py).
    body = re.findall(r"<tool_call>(.*?)</tool_call>", text.split("<|im_start|>user\nhi")[1], re.DOTALL)
    assert len(body) == 1
    name, params = re.search(r"<function=([^>]+)>(.*?)</function>", body[0], re.DOTALL).groups()
    assert name == "read_source"
    assert dict(re.findall(r"<parameter=([^>]+)>(.*?)</parameter>", params, re.DOTALL)) == {
        "qualified_name": "json.dumps",
        "limit": "3",
    }
    assert "<tool_response>\ndef dumps(obj): ...\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Training samples render the disabled-thinking block exactly as the generation prompt does.
    sample = next(s for s in td.chat_samples("json/decoder.py", (td.stdlib_dir() / "json/decoder.py").read_text()))
    rendered = td.render_chat(td.compile_chat_template(), sample)
    assert rendered == tok.apply_chat_template(sample["messages"], tools=sample["tools"], tokenize=False)


MIX_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fractions.py", "email/utils.py")


def test_chat_mix_calls_tools_only_when_offered_and_asked():
    template = td.compile_chat_template()
    samples = [s for rel in MIX_FILES for s in td.chat_samples(rel, (td.stdlib_dir() / rel).read_text())]
    assert {s["kind"] for s in samples} == set(td.CHAT_KINDS)
    assert {s["thinking"] for s in samples if s["kind"] == "use_tool"} == {True, False}
    assert 0.3 < np.mean([s["thinking"] for s in samples]) < 0.7
    for s in samples:
        text = td.render_chat(template, s)
        asked = s["kind"] == "use_tool"
        conversation = text.split("<|im_start|>user\n", 1)[1]  # past the system turn's format example
        assert ("<tool_call>" in conversation) == asked, s
        assert (s["tools"] is not None) == (s["kind"] in td.TOOL_KINDS), s
        if asked:  # the user names the tool; the call is read_source, then the tool's answer, then the reply
            assert "read_source" in s["messages"][0]["content"] or "tool" in s["messages"][0]["content"]
            assert "<function=read_source>" in text and text.count("<|im_start|>assistant\n") == 2
        # Every assistant turn opens with a think block: the model's reasoning, or the empty one that the
        # template pre-fills when thinking is disabled.
        turns = text.split("<|im_start|>assistant\n")[1:]
        assert all(t.startswith("<think>\n") for t in turns), s
        assert all(t.startswith("<think>\n\n</think>\n\n") for t in turns) == (not s["thinking"]), s
        probe = td.chat_probe(s)
        assert probe["expect"] == ("tool_call" if asked else "text") and probe["messages"] == s["messages"][:1]


def test_mtp_losses_read_the_final_norm_of_the_hidden_state():
    """Training's MTP losses use the production wiring (norm(h), the model's own `mtp_input`); the exported
    config carries no pre-norm flag."""
    import optax

    assert "mtp_hidden_before_norm" not in td.hub_config(TINY)
    preset = dataclasses.replace(TINY, mtp_layers=2)  # k = 0 and k > 0; a smaller graph than 3 layers
    model = tiny_model(seed=2, preset=preset)
    assert not model.config.mtp_hidden_before_norm
    # A trained final norm (its init, all ones, is undone by the MTP layer's own hnorm): per-dim scales.
    model.norm.weight.set_value(jax.random.uniform(jax.random.key(3), model.norm.weight.shape, minval=0.2, maxval=3))
    model.lm_head.set_value(model.lm_head.get_value() * 100)  # peaked logits: a loss that tells inputs apart
    trainer = td.make_trainer(model.config, model, preset, seed=0)
    graphdef, biases, params = td.split_model(model)
    rows = jax.random.randint(jax.random.key(1), (2, trainer.window), 0, TINY.vocab_size)
    s = TINY.seq_len
    positions = jnp.broadcast_to(jnp.arange(s), (2, s))

    @jax.jit
    def losses(params, biases):
        _, mtp, _, _, _ = trainer.losses(params, biases, rows)
        m = nnx.merge(graphdef, biases, params)
        hidden, _ = m.hidden_states(rows[:, :s], positions)

        def loss_with(k, feed):  # MTP layer k by hand on a given feed of the target's hidden state
            layer = m.mtp[k]
            h, _ = layer(m.embed(rows[:, k + 1 : k + 1 + s]), feed, positions, None)
            logits = m.logits(h, layer.final_layernorm)
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, k + 2 : k + 2 + s]).mean()

        k_range = range(preset.mtp_layers)
        return (
            mtp,
            jnp.stack([loss_with(k, m.norm(hidden)) for k in k_range]),
            jnp.stack([loss_with(k, hidden) for k in k_range]),
        )

    mtp, post_norm, pre_norm = (np.asarray(x) for x in losses(params, biases))
    np.testing.assert_allclose(mtp, post_norm, rtol=1e-5)
    assert np.all(np.abs(mtp - pre_norm) > 1e-2), (mtp, pre_norm)  # the pre-norm feed is another loss


def test_training_script_runs_and_loss_falls(tiny_data, tmp_path):
    data, _ = tiny_data
    preset = dataclasses.replace(TINY, steps=30, eval_every=30)
    summary = td.train(data, tmp_path, preset, seed=0)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0] - 1.0, losses
    assert np.isfinite(summary["heldout"]["main"]) and len(summary["heldout"]["mtp"]) == 3
    # The saved params load back into a model with the same config (incl. 3 MTP layers).
    model = td.load_checkpoint(tmp_path, preset)
    assert len(model.mtp) == 3
    cfg = MiMoConfig.from_json(tmp_path)
    assert cfg.hidden_size == TINY.hidden_size and cfg.fused_qkv


def test_forward_train_matches_model_and_reports_loads():
    model = tiny_model(seed=3)
    ids = jax.random.randint(jax.random.key(0), (2, 11), 0, TINY.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state):
        m = nnx.merge(graphdef, state)
        return td.forward_train(m, ids, pos), m.hidden_states(ids, pos)[0]

    (hidden, loads), reference = both(state)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(reference), rtol=1e-6, atol=1e-6)
    moe_layers = [i for i, spec in enumerate(model.config.layers) if spec.moe]
    assert sorted(loads) == moe_layers
    for load in loads.values():
        assert load.shape == (TINY.num_experts,)
        np.testing.assert_allclose(float(load.sum()), 1.0, rtol=1e-6)


def test_bias_update_moves_load_towards_balance():
    model = tiny_model()
    _, biases, _ = td.split_model(model)
    layer = next(i for i, spec in enumerate(model.config.layers) if spec.moe)
    load = jnp.asarray([0.7, 0.1, 0.1, 0.1])
    new = td.balance_biases(biases, {layer: load}, rate=0.01)
    delta = np.asarray(new["layers"][layer]["mlp"]["correction_bias"].get_value())
    np.testing.assert_allclose(delta, [-0.01, 0.01, 0.01, 0.01])


def test_train_step_is_pure_and_deterministic(tiny_data):
    data, _ = tiny_data
    tokens = jnp.asarray(np.load(data / "train.npy").astype(np.int32))
    preset = dataclasses.replace(TINY, mtp_layers=1)  # smaller graph: this test is about the step's contract
    model = tiny_model(preset=preset)
    trainer = td.make_trainer(model.config, model, preset, seed=0)
    _, biases, params = td.split_model(model)
    step = jax.jit(trainer.train_step)
    state = trainer.init(params, biases)
    a, ma = step(state, tokens)
    b, mb = step(state, tokens)  # the input state is untouched: same result again
    assert float(ma["loss"]) == float(mb["loss"])
    assert int(a.step) == 1 and int(state.step) == 0
    leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
    assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))
    # The correction bias moved by exactly +-rate (outside the gradient); params moved by the optimizer.
    for path, var in nnx.to_flat_state(a.biases):
        assert np.allclose(np.abs(np.asarray(var.get_value())), TINY.bias_update_rate), path


def test_acceptance_lengths_rounds():
    # hits[k, b, t]: draft k of a chain at t is right. M=3, one row of 12 tokens.
    hits = np.zeros((3, 1, 12), bool)
    hits[:, 0, 2] = [True, True, False]  # round at p=2 accepts 2 drafts -> 3 tokens, next p = 5
    hits[:, 0, 5] = [True, True, True]  # accepts 3 -> 4 tokens, next p = 9 (9 + 4 > 11: stop)
    assert td.acceptance_lengths(hits, start=2) == [3, 4]
    assert td.acceptance_lengths(np.zeros((3, 1, 12), bool), start=0) == [1] * 8


def test_acceptance_by_draft_steps():
    hits = np.zeros((3, 1, 12), bool)
    hits[:, 0, 2] = [True, True, False]
    hits[:, 0, 5] = [True, False, True]
    hits[:, 0, 3] = [True, True, True]  # never a round's position: the round at 2 jumps past it
    # k = 1: rounds at 2 (1 draft accepted -> 2 tokens), 4 (1), 5 (2), 7, 8, 9 (1 each; 9 + 2 < 12 is the last)
    # k = 2: rounds at 2 (3 tokens), 5 (2), 7, 8 -> [3, 2, 1, 1]; k = 3: at 2 (3), 5 (2), 7 (1)
    assert td.acceptance_by_steps(hits, start=2) == [8 / 6, 7 / 4, 6 / 3]


def test_chat_behaviour_counts_tool_calls_by_kind(tmp_path, monkeypatch):
    probes = [
        {"messages": [{"role": "user", "content": "q"}], "tools": None, "enable_thinking": on, "kind": kind}
        for kind, on in [("use_tool", True), ("use_tool", False), ("ask_with_tools", True), ("write", False)]
    ]
    (tmp_path / "heldout_chat.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(td.tokenizer_config(64)))
    (tmp_path / "tokenizer.json").write_text("{}")
    answers = ["<think>\nok\n</think>\n\n<tool_call>\n", "no call", "<think>\n</think>\n\n<tool_call>", "text"]
    monkeypatch.setattr(td, "_greedy_texts", lambda model, tok, texts, n: answers[: len(texts)])
    monkeypatch.setattr("tokenizers.Tokenizer.from_file", lambda path: None)
    result = td.chat_behaviour(None, tmp_path, new_tokens=8)
    assert result["probes"] == 4
    assert result["tool_call_rate_when_asked"] == 0.5
    assert result["tool_call_rate_with_tools_not_asked"] == 1.0
    assert result["tool_call_rate_without_tools"] == 0.0
    assert result["thinking_on_opens_think"] == 1.0  # both thinking-on probes opened a block


def _explicit_chain(model, p: int):
    """Greedy MTP chain at position p, computed the way inference drafts it (no teacher forcing)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def chain(state, seq):
        m = nnx.merge(graphdef, state)
        positions = jnp.arange(p + 1)[None]
        hidden, _ = m.hidden_states(seq[None, : p + 1], positions)
        token = seq[p + 1]  # the target's next token (the bonus) is known
        drafts = []
        for k in range(len(m.mtp)):
            inputs = jnp.concatenate([seq[k + 1 : p + k + 1], token[None]])  # teacher-forced history, draft at p
            _, logits, _ = m.mtp_forward(k, inputs[None], hidden, positions)
            token = jnp.argmax(logits[0, -1]).astype(seq.dtype)
            drafts.append(token)
        return jnp.stack(drafts)

    return lambda seq: [int(t) for t in chain(state, jnp.asarray(seq, jnp.int32))]


def test_teacher_forced_hits_equal_the_drafting_chain():
    model = tiny_model(seed=5)
    rng = np.random.default_rng(0)
    p = 9
    chain = _explicit_chain(model, p)
    seq = rng.integers(0, TINY.vocab_size, p + 2 + len(model.mtp))
    # Make the chain at p right: each next token is what the chain drafts.
    for k in range(len(model.mtp)):
        seq[p + 2 + k] = chain(seq)[k]
    wrong = seq.copy()
    wrong[p + 2] = (seq[p + 2] + 1) % TINY.vocab_size
    hits = td.mtp_draft_hits(model, np.stack([seq, wrong]))
    assert hits[:, 0, p].all()
    assert not hits[0, 1, p]  # a wrong first draft stops the chain


def test_greedy_generate_matches_full_forward_with_left_padding():
    model = tiny_model(seed=7)
    prompts = [[5, 9, 13, 2, 7], [11, 3]]
    new = 6
    out = td.greedy_generate(model, prompts, new_tokens=new)
    graphdef, state = nnx.split(model)
    length = max(map(len, prompts)) + new
    # Causal: right padding does not change the logits of earlier positions, so one shape serves all.
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0][0])
    for prompt, row in zip(prompts, out, strict=True):
        seq = list(prompt)
        for _ in range(new):
            padded = jnp.asarray([seq + [0] * (length - len(seq))])
            seq.append(int(jnp.argmax(forward(state, padded)[len(seq) - 1])))
        assert list(row) == seq[len(prompt) :]
