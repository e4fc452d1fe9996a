"""The MTP drafts' reduced vocabulary (`with_draft_vocab`, FR-Spec): its logits are the full head's on the draft
tokens and -inf elsewhere, views keep it, bad vocabularies are refused (engine behaviour:
tests/engine/test_speculative.py and test_speculative_sampling.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.model.mimo import MiMoModel, with_draft_vocab
from tests.fixtures import TINY_CONFIG, predictable_model

VOCAB = TINY_CONFIG.vocab_size


@pytest.fixture(scope="module")
def model():
    return predictable_model(noise=100.0, mtp_noise=300.0)


@pytest.mark.parametrize("tied", [False, True])
def test_draft_logits_are_the_full_heads_on_the_draft_vocabulary(model, tied):
    if tied:
        model = MiMoModel(TINY_CONFIG.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0), mtp_layers=1)
    ids = np.random.RandomState(0).permutation([t for t in range(VOCAB) if t not in (5, 9, 40)])
    reduced = with_draft_vocab(model, ids)
    assert reduced.draft_vocab == ids.size and model.draft_vocab == 0 and model.draft_head is None  # unchanged
    hidden = jax.random.normal(jax.random.key(1), (2, 3, TINY_CONFIG.hidden_size))
    norm = model.mtp[0].final_layernorm
    full = np.asarray(model.logits(hidden, norm))
    got = np.asarray(nnx.jit(lambda m, h: m.draft_logits(h, m.mtp[0].final_layernorm))(reduced, hidden))
    np.testing.assert_allclose(got[..., ids], full[..., ids], rtol=1e-6, atol=1e-6)
    assert np.isneginf(got[..., [5, 9, 40]]).all()
    np.testing.assert_array_equal(np.asarray(model.draft_logits(hidden, norm)), full)  # no draft vocabulary
    view = reduced.with_options(reduced.options)  # another view keeps it; an empty vocabulary removes it
    np.testing.assert_array_equal(np.asarray(view.draft_ids[...]), ids)
    assert with_draft_vocab(reduced, []).draft_head is None


def test_an_abstract_model_gets_an_abstract_draft_head(model):
    abstract = nnx.eval_shape(lambda: MiMoModel(TINY_CONFIG, mtp_layers=1))
    reduced = with_draft_vocab(abstract, np.arange(10))
    assert reduced.draft_head.get_value().shape == (TINY_CONFIG.hidden_size, 10)
    assert reduced.draft_ids.get_value().dtype == jnp.int32


@pytest.mark.parametrize(
    ("ids", "message"), [([1, 2, 2], "repeat"), ([0, VOCAB], "must lie in"), ([[1, 2]], "1-D"), ([0.5], "1-D")]
)
def test_bad_draft_vocabularies_are_refused(model, ids, message):
    with pytest.raises(ValueError, match=message):
        with_draft_vocab(model, ids)


def test_a_draft_vocabulary_needs_mtp_layers():
    with pytest.raises(ValueError, match="needs MTP layers"):
        with_draft_vocab(MiMoModel(TINY_CONFIG), [1, 2])
