"""Phrase embeddings: the masked mean of token states, normalised, checked by hand on a text
encoder of word vectors; the packaged encoder in the slow tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from stand_ins import UNKNOWN, WORD_VECTORS, word_encoder

from grounding.errors import ConfigError
from grounding.modeling.text import (
    TEXT_ENCODERS,
    TextEncoder,
    distinct_phrases,
    encode_phrases,
    load_text_encoder,
)


def unit(*vectors: tuple[float, ...]) -> np.ndarray:
    mean = np.mean(np.array(vectors, dtype=np.float64), axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


# --- encode_phrases with the word-vector encoder -------------------------------------------


def test_embedding_is_the_normalised_mean_of_the_token_states() -> None:
    red, blue, box, a = (WORD_VECTORS[w] for w in ("red", "blue", "box", "a"))
    texts = ["a red box", "blue", "Red box", "a zebra"]
    embeddings = encode_phrases(word_encoder(), texts, batch_size=8)
    assert embeddings.shape == (4, 3) and embeddings.dtype == np.float32
    # one batch: "blue" is padded to three tokens, and the padding must not count
    np.testing.assert_allclose(embeddings[0], unit(a, red, box), atol=1e-6)
    np.testing.assert_allclose(embeddings[1], unit(blue), atol=1e-6)
    np.testing.assert_allclose(embeddings[2], unit(red, box), atol=1e-6)
    np.testing.assert_allclose(embeddings[3], unit(a, UNKNOWN), atol=1e-6)


def test_embeddings_keep_the_order_and_repeat_identical_texts() -> None:
    texts = ["box", "a red box", "box", "blue box", "a red box"]
    embeddings = encode_phrases(word_encoder(), texts, batch_size=2)
    np.testing.assert_array_equal(embeddings[0], embeddings[2])
    np.testing.assert_array_equal(embeddings[1], embeddings[4])
    singles = np.concatenate([encode_phrases(word_encoder(), [t], batch_size=1) for t in texts])
    np.testing.assert_allclose(embeddings, singles, atol=1e-6)


def test_each_distinct_text_is_encoded_once() -> None:
    encoder = word_encoder()
    seen: list[list[str]] = []
    tokenizer = encoder.tokenizer

    def recording(texts: list[str], **options: object) -> dict:
        seen.append(list(texts))
        return tokenizer(texts, **options)

    counted = TextEncoder(encoder.name, recording, encoder.model, encoder.dim)
    encode_phrases(counted, ["box", "a red box", "box", "box"], batch_size=1)
    assert sorted(text for batch in seen for text in batch) == ["a red box", "box"]


def test_no_texts_give_an_empty_array_and_a_bad_batch_size_is_refused() -> None:
    assert encode_phrases(word_encoder(), [], batch_size=4).shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        encode_phrases(word_encoder(), ["box"], batch_size=0)


def test_distinct_phrases_map_every_phrase_to_its_text() -> None:
    phrases = pd.DataFrame({"phrase_id": [7, 3, 9, 4], "text": ["a man", "a dog", "a man", "café"]})
    texts, rows = distinct_phrases(phrases)
    assert texts == ["a dog", "a man", "café"]
    assert rows["phrase_id"].tolist() == [7, 3, 9, 4]
    assert rows["row"].tolist() == [1, 0, 1, 2]
    assert rows["row"].dtype == np.int64


# --- loading encoders ------------------------------------------------------------------------


def test_unknown_text_encoder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown text encoder .*all-minilm-l6-v2, hf:<ref>"):
        load_text_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match=r"'hf:.*no-such-model': no such Hugging Face model"):
        load_text_encoder(f"hf:{tmp_path / 'no-such-model'}")


def test_the_registry_holds_the_packaged_encoder_and_the_hugging_face_scheme() -> None:
    assert {"all-minilm-l6-v2", "hf"} <= set(TEXT_ENCODERS)
    assert "hf:some/model" in TEXT_ENCODERS and "hf" not in TEXT_ENCODERS


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("all-minilm-l6-v2")


@pytest.mark.slow
def test_phrase_embeddings(minilm: TextEncoder) -> None:
    texts = ["a red circle", "a small red circle", "a man playing guitar", "a red circle", "Ça"]
    embeddings = encode_phrases(minilm, texts, batch_size=2)
    assert embeddings.shape == (5, minilm.dim) == (5, 384)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(embeddings[0], embeddings[3])
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3


@pytest.mark.slow
def test_phrase_embeddings_do_not_depend_on_the_batch(minilm: TextEncoder) -> None:
    texts = ["two dogs", "a very long phrase about a woman in a blue dress", "hats", "a dog"]
    one_batch = encode_phrases(minilm, texts, batch_size=8)
    one_by_one = np.concatenate([encode_phrases(minilm, [t], batch_size=1) for t in texts])
    np.testing.assert_allclose(one_batch, one_by_one, atol=1e-5)
    assert encode_phrases(minilm, [], batch_size=8).shape == (0, 384)


def test_embeddings_under_mixed_precision_are_float32_unit_vectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU's path on the CPU: the encoder under bfloat16 autocast (as on CUDA), the
    pooling and the embeddings in float32, close to the float32 run."""
    import torch

    from grounding.modeling import device

    words = word_encoder()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        projection = torch.nn.Linear(3, 3)

    class Projected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.projection = words.model, projection

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            states = self.words(input_ids, attention_mask).last_hidden_state
            return SimpleNamespace(last_hidden_state=self.projection(states))

    encoder = TextEncoder("projected", words.tokenizer, Projected(), 3)
    texts = sorted(WORD_VECTORS)
    full = encode_phrases(encoder, texts)
    monkeypatch.setattr(
        device, "autocast", lambda _: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    )
    mixed = encode_phrases(encoder, texts)
    assert mixed.dtype == np.float32
    assert not np.array_equal(mixed, full)  # it did run in bfloat16
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(mixed, full, atol=0.03)
