"""The MTP layers as loaded from the released layouts compute what the checkpoint says (a float64 numpy
MTP block written from the architecture notes), and the embedded demo checkpoint's trained MTP layers
speculate with real acceptance.

(The Orbax layout restores the same parameters as a direct load, MTP layers included: tests/tools/test_convert.py.)
"""

import json
import os

import numpy as np
import pytest

import mimo_jax
from tests.fixtures import dequantized_reference, release_fixture


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, rotary: int, theta: float) -> np.ndarray:
    """NeoX rotate-half on the first `rotary` dims of x [T, heads, d]."""
    inv = 1.0 / theta ** (np.arange(0, rotary, 2) / rotary)
    ang = positions[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    r = x[..., :rotary]
    half = np.concatenate([-r[..., rotary // 2 :], r[..., : rotary // 2]], -1)
    return np.concatenate([r * cos + half * sin, x[..., rotary:]], -1)


def mtp_reference(t: dict, c: dict, j: int, tokens: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Logits [T, V] of MTP layer j at positions 0..T-1 (hub tensor names and hub config spelling), reading the
    target's residual stream `hidden` after the model's final norm (SGLang's default worker), or before it
    where the config says `mtp_hidden_before_norm`."""
    p, eps = f"model.mtp.layers.{j}.", c["layernorm_epsilon"]
    if not c.get("mtp_hidden_before_norm", False):
        hidden = rms(hidden, t["model.norm.weight"], eps)
    n, kv = c["swa_num_attention_heads"], c["swa_num_key_value_heads"]
    d, dv = c["swa_head_dim"], c["swa_v_head_dim"]
    e = t["model.embed_tokens.weight"][tokens]
    x = np.concatenate([rms(e, t[p + "enorm.weight"], eps), rms(hidden, t[p + "hnorm.weight"], eps)], -1)
    x = x @ t[p + "eh_proj.weight"].T
    h = rms(x, t[p + "input_layernorm.weight"], eps)
    pos = np.arange(len(tokens))
    a = p + "self_attn."
    q = (h @ t[a + "q_proj.weight"].T).reshape(-1, n, d)
    k = (h @ t[a + "k_proj.weight"].T).reshape(-1, kv, d)
    v = (h @ t[a + "v_proj.weight"].T).reshape(-1, kv, dv) * c["attention_value_scale"]
    rotary = int(d * c["partial_rotary_factor"])
    q, k = rope(q, pos, rotary, c["swa_rope_theta"]), rope(k, pos, rotary, c["swa_rope_theta"])
    visible = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= c["sliding_window_size"])
    out = np.zeros((len(tokens), n, dv))
    for head in range(n):
        g = head // (n // kv)
        s = np.where(visible, q[:, head] @ k[:, g].T / np.sqrt(d), -np.inf)
        s = np.concatenate([s, np.full((len(tokens), 1), t[a + "attention_sink_bias"][head])], -1)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, head] = (w[:, :-1] / w.sum(-1, keepdims=True)) @ v[:, g]
    x = x + out.reshape(len(tokens), -1) @ t[a + "o_proj.weight"].T
    h = rms(x, t[p + "pre_mlp_layernorm.weight"], eps)
    gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t[p + "final_layernorm.weight"], eps) @ t["lm_head.weight"].T


@pytest.mark.parametrize(("layout", "kv_heads"), [("flash", 2), ("fused", 4)])
def test_loaded_mtp_layers_equal_the_checkpoint_math(tmp_path, layout, kv_heads):
    directory = release_fixture(str(tmp_path), layout, kv_heads)[0]
    tensors = {k: v.astype(np.float64) for k, v in dequantized_reference(directory).items()}
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    lm = mimo_jax.load_model(directory, mtp=True)
    assert len(lm.model.mtp) == 3
    length = config["sliding_window_size"] + 5  # past the window
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, config["vocab_size"], length)
    hidden = rs.randn(length, config["hidden_size"]).astype(np.float32)
    positions = np.arange(length)[None]
    for j in range(3):
        _, logits, _ = lm.model.mtp_forward(j, tokens[None], hidden[None], positions)
        want = mtp_reference(tensors, config, j, tokens, hidden.astype(np.float64))
        np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_draft_chain_equals_the_float64_reference_chain(tmp_path):
    """SGLang's default chain written from its semantics in float64: draft j+1 comes from MTP layer j over
    positions 0..P reading norm(h_i) of the target and t_{i+j+1} (the known tokens up to t_{P+1}, then the
    chain's own drafts). All three draft positions, a prompt longer than the window: the draft logits equal it
    to float32 precision and the engine's first round drafts exactly its tokens."""
    directory = release_fixture(str(tmp_path), "fused", 4)[0]
    tensors = {k: v.astype(np.float64) for k, v in dequantized_reference(directory).items()}
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    assert not config.get("mtp_hidden_before_norm", False)
    lm = mimo_jax.load_model(directory, mtp=True)
    length = config["sliding_window_size"] + 6  # P = length - 1, past the window
    prompt = np.random.RandomState(1).randint(0, config["vocab_size"], length)
    positions = np.arange(length)[None]
    hidden, _ = lm.model.hidden_states(prompt[None], positions)
    bonus = int(np.argmax(lm.logits(prompt[None])[0, -1]))  # t_{P+1}: the engine's first (greedy) token
    seq, drafts = [*prompt.tolist(), bonus], []
    for j in range(3):
        layer_tokens = np.array(seq + drafts)[j + 1 : j + 1 + length]  # t_{i+j+1} for i = 0..P
        want = mtp_reference(tensors, config, j, layer_tokens, np.asarray(hidden[0], np.float64))[-1]
        _, got, _ = lm.model.mtp_forward(j, layer_tokens[None], hidden, positions)
        np.testing.assert_allclose(np.asarray(got[0, -1]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        drafts.append(int(np.argmax(want)))
    engine = mimo_jax.Engine(lm, max_batch=1, max_context=64, prefill_chunk=8, speculative_steps=3)
    engine.add("r", prompt.tolist(), mimo_jax.SamplingOptions(max_new_tokens=8))
    rounds = []
    while engine.has_work():
        for out in engine.step(max_tokens_per_round=1):
            rounds += out.drafts
    assert rounds[0] == drafts


# From statistics.py of the Python standard library, which the demo model never trained on.
HELDOUT = '''def median_low(data):
    """Return the low median of numeric data.

    When the number of data points is odd, the middle value is returned.
    When it is even, the smaller of the two middle values is returned.
'''


def test_demo_checkpoint_speculates_with_real_acceptance():
    from tokenizers import Tokenizer

    from mimo_jax.weights.demo import demo_model_dir

    directory = demo_model_dir()
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(HELDOUT).ids
    lm = mimo_jax.load_model(directory, mtp=True)
    kwargs = dict(max_new_tokens=48, ignore_eos=True, prefill_chunk=32)
    (plain,) = mimo_jax.generate(lm, [ids], **kwargs)
    (spec,) = mimo_jax.generate(lm, [ids], speculative_steps=3, **kwargs)
    assert spec.token_ids == plain.token_ids
    assert spec.mean_accept_length > 2.0, spec.accepted_per_forward
    rates = spec.acceptance_rates
    assert rates[0] >= rates[1] >= rates[2] > 0
