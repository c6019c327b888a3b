"""The text-embedding cache: round trips, memory-mapped reopening, resumable and incremental builds, the benchmark."""

import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_config
from modeling_anatomy_vlm import AnatomyVLMModel
from train.text import cache as cache_module
from train.text.cache import TextEmbeddingCache, cache_folder

TEXTS = [f"finding {i} in the {'left' if i % 2 else 'right'} lung{' zone' * (i % 5)}" for i in range(50)]
DIM = 8


def vectors_of(texts) -> np.ndarray:
    """A deterministic stand-in encoder: each text's vector depends on its text only."""
    return np.stack([np.random.default_rng(list(t.encode())).standard_normal(DIM, dtype=np.float32) for t in texts])


class CountingEmbed:
    """`vectors_of`, recording every text it embeds; raises instead of embedding chunk `fail_at` (0-based)."""

    def __init__(self, fail_at=None):
        self.fail_at, self.calls = fail_at, []

    def __call__(self, texts):
        if len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        self.calls.append(list(texts))
        return vectors_of(texts)

    @property
    def embedded(self):
        return [t for call in self.calls for t in call]


def fill(path, texts=TEXTS, embed=None, fingerprint="encoder-a", dtype="float32", chunk_size=8):
    return TextEmbeddingCache.fill(path, texts, embed or CountingEmbed(), fingerprint=fingerprint, dim=DIM,
                                   dtype=dtype, chunk_size=chunk_size, progress=False)


def files_of(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0), ("float16", 1e-3)])
def test_round_trip(tmp_path, dtype, tolerance):
    cache = fill(tmp_path / "cache", dtype=dtype)
    reopened = TextEmbeddingCache.open(tmp_path / "cache")
    for opened in (cache, reopened):
        found = opened.lookup(TEXTS[::-1] + ["  finding 3 in the\tleft lung zone zone zone "])  # normalised texts
        assert found.dtype == torch.float32 and found.shape == (len(TEXTS) + 1, DIM)
        expected = torch.from_numpy(vectors_of(TEXTS[::-1] + [TEXTS[3]]))
        torch.testing.assert_close(found, expected, atol=tolerance, rtol=tolerance)
    assert len(reopened) == len(TEXTS) and reopened.fingerprint == "encoder-a" and reopened.dtype == dtype
    assert sorted(reopened.texts()) == sorted(TEXTS)
    assert TEXTS[0] in reopened and "another text" not in reopened


def test_unknown_text_is_a_key_error_naming_it(tmp_path):
    cache = fill(tmp_path / "cache")
    message = "1 texts are not in the text-embedding cache (e.g. ['no such text'])"
    with pytest.raises(KeyError, match=re.escape(message)):
        cache.lookup([TEXTS[0], "no such text"])
    empty = fill(tmp_path / "empty", texts=[])
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        empty.lookup(["left lung"])


def test_reopening_maps_the_vectors_without_reading_them(tmp_path):
    fill(tmp_path / "cache")
    cache = TextEmbeddingCache.open(tmp_path / "cache")
    assert isinstance(cache.vectors, np.memmap) and isinstance(cache.index, np.memmap)
    assert cache.vectors.shape == (len(TEXTS), DIM) and cache.index.shape == (3, len(TEXTS))
    assert np.all(np.diff(cache.index[0].astype(np.float64)) >= 0)  # hi words sorted
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers get the folder, not a copy of the vectors
    assert len(pickle.dumps(cache)) < 1000
    torch.testing.assert_close(clone.lookup(TEXTS), cache.lookup(TEXTS), atol=0, rtol=0)


def test_a_killed_build_resumes_to_the_uninterrupted_result(tmp_path):
    straight = fill(tmp_path / "straight")
    killed = CountingEmbed(fail_at=2)
    with pytest.raises(RuntimeError, match="killed"):
        fill(tmp_path / "resumed", embed=killed)
    assert len(TextEmbeddingCache.open(tmp_path / "resumed")) == 16  # two chunks of 8 were committed
    for name in ("vectors.bin", "hashes.bin", "texts.txt"):  # a kill in the middle of writing chunk 3
        with open(tmp_path / "resumed" / name, "ab") as handle:
            handle.write(b"\x01torn")
    rest = CountingEmbed()
    resumed = fill(tmp_path / "resumed", embed=rest)
    assert sorted(killed.embedded + rest.embedded) == sorted(TEXTS)  # every text embedded exactly once
    assert not set(killed.embedded) & set(rest.embedded)
    np.testing.assert_array_equal(resumed.vectors, straight.vectors)
    np.testing.assert_array_equal(resumed.index, straight.index)
    assert files_of(resumed.folder) == files_of(straight.folder)


def test_extending_embeds_only_the_new_texts(tmp_path):
    first = CountingEmbed()
    fill(tmp_path / "cache", texts=TEXTS[:30], embed=first)
    again = CountingEmbed()
    fill(tmp_path / "cache", texts=TEXTS[:30], embed=again)
    assert again.calls == []  # a cache holding every text is reused as it is
    more = CountingEmbed()
    extended = fill(tmp_path / "cache", texts=TEXTS + [TEXTS[40] + " ", "brand new text"], embed=more)
    assert sorted(more.embedded) == sorted(TEXTS[30:] + ["brand new text"])
    torch.testing.assert_close(extended.lookup(TEXTS), torch.from_numpy(vectors_of(TEXTS)), atol=0, rtol=0)


def test_another_fingerprint_or_dtype_rebuilds(tmp_path):
    fill(tmp_path / "cache")
    other = CountingEmbed()
    rebuilt = fill(tmp_path / "cache", embed=other, fingerprint="encoder-b")
    assert rebuilt.fingerprint == "encoder-b" and sorted(other.embedded) == sorted(TEXTS)
    halved = CountingEmbed()
    assert fill(tmp_path / "cache", embed=halved, fingerprint="encoder-b", dtype="float16").dtype == "float16"
    assert len(halved.embedded) == len(TEXTS)


def test_texts_sharing_the_high_hash_word_are_told_apart(tmp_path, monkeypatch):
    real = cache_module.hash_normalized

    def colliding(texts):  # keep 2 bits of the hi word: about 12 texts share each hi word
        hashes = real(texts).copy()
        hashes[:, 0] &= 3
        return hashes

    monkeypatch.setattr(cache_module, "hash_normalized", colliding)
    cache = fill(tmp_path / "cache")
    torch.testing.assert_close(cache.lookup(TEXTS), torch.from_numpy(vectors_of(TEXTS)), atol=0, rtol=0)
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        cache.lookup(["no such text"])


def test_the_trainers_file_name_maps_to_a_folder(tmp_path):
    assert cache_folder(tmp_path / "text_cache.safetensors") == tmp_path / "text_cache"
    assert cache_folder(tmp_path / "text_cache") == tmp_path / "text_cache"


def test_cached_embeddings_give_the_same_loss(tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    texts = ["pleural effusion in the right costophrenic angle", "no pneumothorax in the left apical zone",
             "The heart is mildly enlarged.", "the spine is normal"]
    cache = TextEmbeddingCache.load_or_build(tmp_path / "text_cache.safetensors", model, processor.tokenizer,
                                             texts + ["unused text"], batch_size=2, chunk_size=3, progress=False)
    tokens = processor.tokenize(texts)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    positive = torch.zeros(2, 29, len(texts), dtype=torch.bool)
    positive[0, 6, 0] = positive[1, 13, 1] = positive[0, 24, 2] = positive[1, 17, 3] = True
    common = dict(pixel_values=pixels, phrase_positive_mask=positive)
    with torch.no_grad():
        from_tower = model(phrase_input_ids=tokens["input_ids"], phrase_attention_mask=tokens["attention_mask"],
                           **common)
        from_cache = model(phrase_text_embeds=cache.lookup(texts), **common)
    torch.testing.assert_close(from_cache.loss_fine, from_tower.loss_fine, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="not in the text-embedding cache"):
        cache.lookup(["a text never embedded"])


def test_cache_is_rebuilt_for_another_encoder(tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    path = tmp_path / "text_cache.safetensors"
    first = TextEmbeddingCache.load_or_build(path, model, processor.tokenizer, ["left lung", "right lung"],
                                             progress=False)
    assert sorted(TextEmbeddingCache.open(path).texts()) == ["left lung", "right lung"]
    first_vectors = first.lookup(["left lung", "right lung"])
    other = AnatomyVLMModel.from_encoders(tiny_config())
    with torch.no_grad():
        other.text_model.embeddings.word_embeddings.weight.mul_(1.5)  # a different encoder
    rebuilt = TextEmbeddingCache.load_or_build(path, other, processor.tokenizer, ["left lung", "right lung"],
                                               progress=False)
    assert rebuilt.fingerprint != first.fingerprint
    assert not torch.allclose(rebuilt.lookup(["left lung", "right lung"]), first_vectors)


def test_benchmark_cli_last_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.bench.text_cache", "--texts", "3000", "--dim", "16", "--chunk-size", "1000",
         "--batch-size", "256", "--lookup-batches", "3", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=True)
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"texts=3000 build_s=([\d.]+) reopen_s=([\d.]+) lookups_per_s=(\d+) peak_rss_gb=([\d.]+)",
                         last)
    assert match, last
    assert int(match[3]) > 0 and float(match[4]) > 0
    assert list(tmp_path.iterdir()) == []  # the cache is deleted unless --keep
