"""Text-embedding cache: the frozen text tower's output for every training text, computed once.

The text tower never changes during training, so each phrase and prompt is embedded once (batched, under
`torch.no_grad`) and stored by its whitespace-normalised text in a safetensors file. Training steps look the
texts up here and never run the tower. The file records a fingerprint of the encoder (weights, config,
pooling, max length); a cache made by another encoder is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch

from train.labels import normalize_text

logger = logging.getLogger("anatomy_vlm.text_cache")


def encoder_fingerprint(model) -> str:
    """Hash of what decides a text's embedding: the text tower's weights and config, pooling, max length."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.text_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"{model.config.text_pooling}|{model.config.max_text_length}".encode())
    for name, tensor in sorted(model.text_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TextEmbeddingCache:
    """`texts` -> rows of `embeddings` ([N, text_hidden] float32, frozen-tower outputs)."""

    def __init__(self, texts: Sequence[str], embeddings: torch.Tensor, fingerprint: str):
        if len(texts) != embeddings.shape[0]:
            raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
        self.texts = list(texts)
        self.embeddings = embeddings
        self.fingerprint = fingerprint
        self.index = {text: i for i, text in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text: str) -> bool:
        return normalize_text(text) in self.index

    def indices(self, texts: Iterable[str]) -> torch.Tensor:
        rows, missing = [], []
        for text in texts:
            row = self.index.get(normalize_text(text))
            if row is None:
                missing.append(text)
            rows.append(row)
        if missing:
            raise KeyError(f"{len(missing)} texts are not in the text-embedding cache (e.g. {missing[:3]!r}); "
                           "rebuild it over the data being trained on")
        return torch.tensor(rows, dtype=torch.long)

    def lookup(self, texts: Iterable[str]) -> torch.Tensor:
        """`[T, text_hidden]` cached tower outputs of `texts` (KeyError naming missing texts)."""
        return self.embeddings[self.indices(texts)]

    @classmethod
    @torch.no_grad()
    def build(cls, model, tokenizer, texts: Iterable[str], batch_size: int = 256, progress: bool = True):
        from tqdm import tqdm

        texts = sorted({normalize_text(t) for t in texts})
        device = next(model.text_model.parameters()).device
        model.text_model.eval()
        chunks = []
        # Sorting by length keeps padding small; the order is undone by `order` below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in tqdm(range(0, len(texts), batch_size), desc="text cache", unit="batch", disable=not progress):
            batch = [texts[i] for i in order[start : start + batch_size]]
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=model.config.max_text_length,
                               return_tensors="pt").to(device)
            chunks.append(model.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"]).float().cpu())
        embeddings = torch.empty(len(texts), model.config.text_config.hidden_size)
        if chunks:
            embeddings[torch.tensor(order)] = torch.cat(chunks)
        return cls(texts, embeddings, encoder_fingerprint(model))

    def save(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": self.embeddings.contiguous()}, str(tmp),
                  metadata={"fingerprint": self.fingerprint, "texts": json.dumps(self.texts)})
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "TextEmbeddingCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            embeddings = handle.get_tensor("embeddings")
        return cls(json.loads(metadata["texts"]), embeddings, metadata["fingerprint"])

    @classmethod
    def load_or_build(cls, path, model, tokenizer, texts: Iterable[str], batch_size: int = 256):
        """Reuse the file at `path` if it was made by this encoder and holds every text; else rebuild it."""
        texts = {normalize_text(t) for t in texts}
        path = Path(path)
        fingerprint = encoder_fingerprint(model)
        if path.is_file():
            cached = cls.load(path)
            if cached.fingerprint != fingerprint:
                logger.warning("text cache %s was made by another text encoder; rebuilding", path)
            elif not texts <= set(cached.index):
                logger.info("text cache %s lacks %d texts; rebuilding", path, len(texts - set(cached.index)))
            else:
                logger.info("text cache: %d texts from %s", len(cached), path)
                return cached
        cache = cls.build(model, tokenizer, texts, batch_size)
        cache.save(path)
        logger.info("text cache: embedded %d texts into %s", len(cache), path)
        return cache
