"""Frozen text-tower outputs kept between `interpret` calls: a bounded memo and a checkpoint's precomputed prompts.

Scoring a finding embeds its prompts (one global prompt per template, a positive and a negated prompt per region and
template: 59 texts for one template each and 29 regions), so a server that scores free text would otherwise keep
every text anyone ever sent. `PromptMemo` keeps the most recently used ones within a byte budget, and pins the
checkpoint's precomputed prompts of its default findings (`prompt_embeds.safetensors`, written by
`AnatomyVLMModel.save_prompt_embeds`), which are never evicted.

The precomputed file is trusted only for the text encoder that made it: it records a fingerprint of the tower's
weights, the tokenizer, the pooling and the maximum length, and a file made by any other encoder is ignored. Each
vector is stored with its exact prompt text, so prompts of other templates or findings are simply not found.
"""

import hashlib
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

PROMPT_EMBEDS_NAME = "prompt_embeds.safetensors"
DEFAULT_PROMPT_MEMO_BYTES = 64 * 2**20
# Bytes of one memo entry besides its vector and its key string: the ordered-dict slot and the row number.
ENTRY_OVERHEAD_BYTES = 128


def entry_bytes(text: str, hidden_size: int) -> int:
    """Bytes one memo entry holds: its float32 vector, its key and `ENTRY_OVERHEAD_BYTES`."""
    return 4 * hidden_size + sys.getsizeof(text) + ENTRY_OVERHEAD_BYTES


class PromptMemo:
    """Text -> `[text_hidden]` float32 tower output: pinned entries (a checkpoint's precomputed prompts, outside the
    budget, never evicted) and a least-recently-used memo of other texts whose `entry_bytes` sum, `nbytes`, never
    exceeds `max_bytes`.

    The memo's vectors are rows of one `[capacity, text_hidden]` table allocated on first use, and evicted rows are
    reused. One small allocation per text would not do: kept between the text tower's large temporary activations,
    such allocations fragment the heap, and a process that memoised 35k texts that way grew 12 KB per text, not the
    1.5 KB of its vector. Thread-safe: the Space runs several requests at once.
    """

    def __init__(self, max_bytes: int = DEFAULT_PROMPT_MEMO_BYTES):
        self._lock = threading.Lock()
        self._pinned: dict[str, torch.Tensor] = {}
        self._clear_recent()
        self.max_bytes = max_bytes

    def _clear_recent(self):
        self._rows: OrderedDict[str, int] = OrderedDict()  # text -> row of `_table`, least recently used first
        self._table: torch.Tensor | None = None
        self._free_rows: list[int] = []
        self.nbytes = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int):
        """A new budget starts an empty memo (pinned entries stay)."""
        if value < 0:
            raise ValueError(f"PromptMemo: max_bytes must be >= 0, got {value}")
        with self._lock:
            self._max_bytes = int(value)
            self._clear_recent()

    def lookup(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The known texts of `texts` -> their vectors (copies: a row may be reused once the lock is released)."""
        with self._lock:
            found = {text: self._pinned[text] for text in texts if text in self._pinned}
            recent = [text for text in dict.fromkeys(texts) if text not in found and text in self._rows]
            for text in recent:
                self._rows.move_to_end(text)
            if recent:
                found.update(zip(recent, self._table[[self._rows[text] for text in recent]]))
            return found

    def store(self, texts: list[str], embeds: torch.Tensor):
        """Remember `embeds` `[len(texts), text_hidden]`, evicting the least recently used texts beyond the budget."""
        embeds = embeds.detach().to("cpu", torch.float32)
        hidden_size = embeds.shape[-1]
        with self._lock:
            if self._table is None:
                capacity = self._max_bytes // entry_bytes("", hidden_size)  # no entry costs less
                self._table = torch.empty(capacity, hidden_size)  # pages become resident as rows are written
                self._free_rows = list(range(capacity - 1, -1, -1))
            for text, embed in zip(texts, embeds):
                cost = entry_bytes(text, hidden_size)
                if text in self._pinned or text in self._rows or cost > self._max_bytes:
                    continue
                while self.nbytes + cost > self._max_bytes or not self._free_rows:
                    evicted, row = self._rows.popitem(last=False)
                    self._free_rows.append(row)
                    self.nbytes -= entry_bytes(evicted, hidden_size)
                row = self._free_rows.pop()
                self._table[row] = embed
                self._rows[text] = row
                self.nbytes += cost

    def pin(self, embeds: Mapping[str, torch.Tensor]):
        """Replace the pinned entries."""
        pinned = {text: embed.detach().to("cpu", torch.float32) for text, embed in embeds.items()}
        with self._lock:
            self._pinned = pinned
            for text in pinned.keys() & self._rows.keys():
                self._free_rows.append(self._rows.pop(text))
                self.nbytes -= entry_bytes(text, self._table.shape[1])

    @property
    def num_pinned(self) -> int:
        return len(self._pinned)

    def clear(self):
        with self._lock:
            self._pinned = {}
            self._clear_recent()

    def __len__(self) -> int:
        return len(self._pinned) + len(self._rows)

    # A model holding a memo is deep-copied (merging LoRA) and pickled: a copy starts empty, with the same budget.
    def __getstate__(self):
        return {"max_bytes": self._max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])


def text_encoder_fingerprint(tower_state: Mapping[str, torch.Tensor], tokenizer, pooling: str, max_length: int) -> str:
    """SHA-256 of everything that decides a text's tower output: the tower's weights (names, dtypes, shapes, bytes),
    the tokenizer's vocabulary and rules, the pooling and the maximum length."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        rules = json.loads(backend.to_str())
        rules.pop("truncation", None), rules.pop("padding", None)  # set per call by the tokenizer's arguments
    else:
        rules = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([type(tokenizer).__name__, rules, pooling, max_length], sort_keys=True).encode())
    for name in sorted(tower_state):
        tensor = tower_state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_prompt_embeds(path: str, embeds: Mapping[str, torch.Tensor], fingerprint: str):
    """`embeds` (text -> tower output) as one `[P, text_hidden]` float32 tensor, with the texts and `fingerprint`
    in the safetensors header."""
    texts = list(embeds)
    matrix = torch.stack([embeds[text].detach().to("cpu", torch.float32) for text in texts]).contiguous()
    save_file({"text_tower_embeds": matrix}, path, metadata={"fingerprint": fingerprint, "texts": json.dumps(texts)})


def read_prompt_embeds(path: str, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """text -> tower output from a `write_prompt_embeds` file; None (logged) when another text encoder made it or
    the file is unreadable: the prompts are then embedded as usual."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                logger.info("%s was made by another text encoder: not used", PROMPT_EMBEDS_NAME)
                return None
            matrix = handle.get_tensor("text_tower_embeds")
            texts = json.loads(metadata["texts"])
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        logger.warning("%s is unreadable (%s): not used", PROMPT_EMBEDS_NAME, err)
        return None
    if len(texts) != len(matrix):
        logger.warning("%s holds %d texts but %d vectors: not used", PROMPT_EMBEDS_NAME, len(texts), len(matrix))
        return None
    return dict(zip(texts, matrix))


def checkpoint_file(name_or_path: str | None, filename: str) -> str | None:
    """`filename` of a checkpoint folder or Hub repo (downloaded), or None where it has none."""
    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name_or_path, filename)
    except (EntryNotFoundError, HFValidationError, OSError) as err:  # OSError: offline, no such repo, no access
        logger.info("no %s for %s (%s)", filename, name_or_path, type(err).__name__)
        return None
