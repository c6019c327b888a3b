"""Text-embedding cache: the frozen text tower's output for every training text, computed once.

The text tower never changes during training, so each phrase and prompt is embedded once (batched, under
`torch.no_grad`) and training steps look the texts up here instead of running the tower. Real report language
(MIMIC-CXR + Chest ImaGenome, every unique phrase and its rewrites) is millions of texts, so nothing here holds
all texts in memory or in one header. The cache is a folder:

    manifest.json  format, encoder fingerprint, dim, dtype, count (committed rows), texts_bytes. The commit point:
                   only the first `count` rows of the files below exist for readers.
    vectors.bin    [count, dim] raw little-endian float16 or float32, row r = the tower output of text r;
                   memory-mapped when opened, never read whole.
    hashes.bin     [count, 2] uint64, row r = 128-bit BLAKE2b of text r's normalised UTF-8 (hi, lo).
    index.npy      [3, count] uint64: hashes.bin's hi sorted, its lo and its row in that order; memory-mapped;
                   derived from hashes.bin and rewritten whenever its count differs from the manifest's.
    texts.txt      text r on line r (normalised texts hold no line breaks): for people and `texts()`, never read
                   to open the cache or look texts up.

A text's identity is its 128-bit hash: two distinct texts share one with probability about n^2 / 2^129 (1e-25 for
n = 10^7 texts), which is taken as never. `lookup` hashes a batch (one BLAKE2b call per text), finds the rows with
one `np.searchsorted` over the sorted hi words, checks the lo words, and gathers the rows with one fancy index;
two texts that share only the hi word (probability about n^2 / 2^65) are resolved by a scan of that run.

Building appends rows in chunks; each chunk is written, fsynced, and committed by rewriting manifest.json
atomically (temp file + rename). A build killed at any point resumes from the last committed chunk: bytes past the
committed rows are truncated away and only the texts still missing are embedded. Extending a cache with new texts
is the same operation. The manifest records a fingerprint of the encoder (weights, config, pooling, max length);
a cache made by another encoder (or with another dim or dtype) is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from train.text.region_texts import normalize_text

logger = logging.getLogger("anatomy_vlm.text_cache")

FORMAT = 1
DTYPES = ("float16", "float32")
LEGACY_SUFFIX = ".safetensors"  # the single-file cache this folder replaced; the trainer still passes that name


def encoder_fingerprint(model) -> str:
    """Hash of what decides a text's embedding: the text tower's weights and config, pooling, max length."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.text_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"{model.config.text_pooling}|{model.config.max_text_length}".encode())
    for name, tensor in sorted(model.text_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_folder(path) -> Path:
    """The folder of the cache at `path`: `text_cache.safetensors` (the old file name) -> `text_cache/`."""
    path = Path(path)
    return path.with_suffix("") if path.suffix == LEGACY_SUFFIX else path


def hash_normalized(texts: Sequence[str]) -> np.ndarray:
    """`[n, 2]` uint64 (hi, lo): the 128-bit BLAKE2b of each already-normalised text's UTF-8."""
    digests = b"".join(hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts)
    return np.frombuffer(digests, dtype="<u8").reshape(len(texts), 2)


def _storage_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"text cache dtype {name!r}; choose from {DTYPES}")
    return np.dtype(name).newbyteorder("<")


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


class _Appender:
    """Appends committed chunks to a cache folder; opening it drops whatever a killed build left past `count`."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        row_bytes = manifest["dim"] * _storage_dtype(manifest["dtype"]).itemsize
        committed = {"vectors.bin": manifest["count"] * row_bytes, "hashes.bin": manifest["count"] * 16,
                     "texts.txt": manifest["texts_bytes"]}
        self.files = {}
        for name, size in committed.items():
            handle = open(folder / name, "ab")
            handle.truncate(size)
            self.files[name] = handle

    def append(self, vectors: np.ndarray, hashes: np.ndarray, texts: Sequence[str]) -> None:
        text_bytes = "".join(text + "\n" for text in texts).encode()
        for name, data in (("vectors.bin", vectors.tobytes()), ("hashes.bin", hashes.tobytes()),
                           ("texts.txt", text_bytes)):
            self.files[name].write(data)
            self.files[name].flush()
            os.fsync(self.files[name].fileno())
        self.manifest["count"] += len(texts)
        self.manifest["texts_bytes"] += len(text_bytes)
        _write_json_atomic(self.folder / "manifest.json", self.manifest)  # the commit

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


class TextEmbeddingCache:
    """Normalised text -> its frozen-tower embedding, stored in a folder (see the module docstring).

    Attributes:
        folder: the cache folder.
        fingerprint, dim, dtype: of the encoder and storage that made it.
        vectors: `[N, dim]` np.memmap (an empty array when N = 0) in storage order.
        index: `[3, N]` uint64 memmap: sorted hi hash words, their lo words, their rows of `vectors`.
    """

    def __init__(self, folder: Path, manifest: dict, vectors: np.ndarray, index: np.ndarray):
        self.folder, self.manifest = folder, manifest
        self.fingerprint, self.dim, self.dtype = manifest["fingerprint"], manifest["dim"], manifest["dtype"]
        self.vectors, self.index = vectors, index

    def __len__(self) -> int:
        return self.manifest["count"]

    def __contains__(self, text: str) -> bool:
        return bool(self._locate(hash_normalized([normalize_text(text)]))[1][0])

    def __reduce__(self):  # DataLoader workers reopen the folder instead of receiving a pickled copy of the vectors
        return type(self).open, (self.folder,)

    # ------------------------------------------------------------------------------------------------- reading
    @classmethod
    def open(cls, path) -> "TextEmbeddingCache":
        """Open the cache at `path` (see `cache_folder`).

        Reads manifest.json and the header of index.npy; memory-maps vectors.bin and index.npy, so their pages are
        read only as lookups touch them. When index.npy does not match the manifest's count (a build that was
        killed or extended) it is rebuilt from hashes.bin (16 bytes a text, sorted once) and rewritten atomically.
        """
        folder = cache_folder(path)
        manifest = _read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"no text-embedding cache in {folder} (manifest.json is missing)")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"text cache {folder} has format {manifest.get('format')}, this code reads {FORMAT}")
        count, dim = manifest["count"], manifest["dim"]
        dtype = _storage_dtype(manifest["dtype"])
        if count == 0:  # an empty file cannot be memory-mapped
            return cls(folder, manifest, np.zeros((0, dim), dtype), np.zeros((3, 0), np.uint64))
        vectors = np.memmap(folder / "vectors.bin", dtype=dtype, mode="r", shape=(count, dim))
        index_path = folder / "index.npy"
        index = np.load(index_path, mmap_mode="r") if index_path.is_file() else None
        if index is None or index.shape != (3, count):
            hashes = np.fromfile(folder / "hashes.bin", dtype="<u8", count=2 * count).reshape(count, 2)
            order = np.argsort(hashes[:, 0], kind="stable")
            tmp = folder / "index.tmp.npy"
            np.save(tmp, np.stack([hashes[order, 0], hashes[order, 1], order.astype(np.uint64)]))
            os.replace(tmp, index_path)
            index = np.load(index_path, mmap_mode="r")
        return cls(folder, manifest, vectors, index)

    def _locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `vectors` for `[n, 2]` hashes, and whether each was found (rows of missing ones are 0)."""
        hi, lo = hashes[:, 0], hashes[:, 1]
        sorted_hi, sorted_lo, rows = self.index
        if len(self) == 0:
            return np.zeros(len(hi), np.intp), np.zeros(len(hi), bool)
        order = np.argsort(hi)  # increasing keys let each binary search start from the previous one's result
        at = np.empty(len(hi), np.intp)
        at[order] = np.minimum(np.searchsorted(sorted_hi, hi[order]), len(self) - 1)
        same_hi = sorted_hi[at] == hi
        found = same_hi & (sorted_lo[at] == lo)
        # A hi word shared by two texts (about n^2 / 2^65): scan the run of equal hi words for the lo word.
        shared = np.flatnonzero(same_hi & ~found)
        for i in shared:
            j = at[i] + 1
            while j < len(self) and sorted_hi[j] == hi[i]:
                if sorted_lo[j] == lo[i]:
                    at[i], found[i] = j, True
                    break
                j += 1
        return np.where(found, rows[at], 0).astype(np.intp), found

    def lookup(self, texts: Iterable[str], as_stored: bool = False) -> torch.Tensor:
        """`[T, dim]` float32 cached tower outputs of `texts` (KeyError naming missing texts); with `as_stored`, in
        the cache's own dtype (a float16 cache's rows cross to the device at half the bytes)."""
        texts = list(texts)
        rows, found = self._locate(hash_normalized([normalize_text(t) for t in texts]))
        if not found.all():
            missing = [texts[i] for i in np.flatnonzero(~found)[:3]]
            raise KeyError(f"{int((~found).sum())} texts are not in the text-embedding cache (e.g. {missing!r}); "
                           "rebuild it over the data being trained on")
        return torch.from_numpy(np.asarray(self.vectors[rows], dtype=None if as_stored else np.float32))

    def texts(self) -> Iterator[str]:
        """The cached texts in storage order, read from texts.txt (for people; lookups never need them)."""
        with open(self.folder / "texts.txt", encoding="utf-8", newline="\n") as handle:
            for line in islice(handle, len(self)):
                yield line[:-1]

    # ------------------------------------------------------------------------------------------------- building
    @classmethod
    def fill(cls, path, texts: Iterable[str], embed: Callable[[list[str]], np.ndarray], *, fingerprint: str,
             dim: int, dtype: str = "float32", chunk_size: int = 8192, progress: bool = True) -> "TextEmbeddingCache":
        """Create, resume or extend the cache at `path` so it holds every text of `texts`; returns it opened.

        `embed(texts) -> [len(texts), dim]` (array or tensor) computes the vectors; it is called once per chunk of
        at most `chunk_size` texts that the cache lacks, in order of length (little padding for a tokenizer), and
        each chunk is committed before the next one is embedded. A cache of another fingerprint, dim or dtype is
        deleted and rebuilt. The texts to embed are deduplicated after `normalize_text`.
        """
        folder = cache_folder(path)
        wanted = {"format": FORMAT, "fingerprint": fingerprint, "dim": int(dim), "dtype": _storage_dtype(dtype).name}
        manifest = _read_manifest(folder)
        if manifest is not None and {k: manifest.get(k) for k in wanted} != wanted:
            logger.warning("text cache %s was made by another text encoder (or dim, dtype); rebuilding", folder)
            shutil.rmtree(folder)
            manifest = None
        if manifest is None:  # new, or a build killed before its first commit: start from nothing
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "index.npy").unlink(missing_ok=True)
            manifest = {**wanted, "count": 0, "texts_bytes": 0}
            _write_json_atomic(folder / "manifest.json", manifest)

        unique = list(dict.fromkeys(map(normalize_text, texts)))
        hashes = hash_normalized(unique)
        missing = np.flatnonzero(~cls.open(folder)._locate(hashes)[1])
        lengths = np.fromiter((len(unique[i]) for i in missing), dtype=np.int64, count=len(missing))
        missing = missing[np.lexsort((hashes[missing, 1], hashes[missing, 0], lengths))]  # a deterministic order
        if len(missing):
            from tqdm import tqdm

            appender = _Appender(folder, manifest)
            try:
                with tqdm(total=len(missing), desc="text cache", unit="text", unit_scale=True,
                          disable=not progress) as bar:
                    for start in range(0, len(missing), chunk_size):
                        chunk = missing[start : start + chunk_size]
                        chunk_texts = [unique[i] for i in chunk]
                        vectors = np.asarray(embed(chunk_texts))
                        if vectors.shape != (len(chunk), dim):
                            raise ValueError(f"embed returned {vectors.shape} for {len(chunk)} texts of dim {dim}")
                        appender.append(vectors.astype(_storage_dtype(dtype)), hashes[chunk], chunk_texts)
                        bar.update(len(chunk))
            finally:
                appender.close()
        logger.info("text cache %s: %d texts, %d embedded now", folder, manifest["count"], len(missing))
        return cls.open(folder)

    @classmethod
    def load_or_build(cls, path, model, tokenizer, texts: Iterable[str], batch_size: int = 256,
                      dtype: str = "float32", chunk_size: int = 8192, progress: bool = True) -> "TextEmbeddingCache":
        """The cache at `path` (a folder, see `cache_folder`) holding every text of `texts`, embedded by `model`.

        Reused as it is when made by this encoder and holding every text; extended with only the missing texts
        (also how a killed build resumes); rebuilt when made by another encoder.
        """
        if Path(path).is_file():
            logger.warning("%s is a single-file text cache of an older format and is no longer read; the cache is "
                           "the folder %s (the file can be deleted)", path, cache_folder(path))
        return cls.fill(path, texts, tower_embedder(model, tokenizer, batch_size),
                        fingerprint=encoder_fingerprint(model), dim=model.config.text_config.hidden_size,
                        dtype=dtype, chunk_size=chunk_size, progress=progress)


def tower_embedder(model, tokenizer, batch_size: int = 256) -> Callable[[list[str]], np.ndarray]:
    """`embed(texts) -> [len(texts), text_hidden]` float32 frozen-tower outputs, in batches of `batch_size`."""
    device = next(model.text_model.parameters()).device
    model.text_model.eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        outputs = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                               max_length=model.config.max_text_length, return_tensors="pt").to(device)
            outputs.append(model.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"]).float().cpu())
        return torch.cat(outputs).numpy()

    return embed
