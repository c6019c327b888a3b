"""Where a model comes from: a local folder, or the Hugging Face Hub only when asked for by name.

`from_pretrained("outptus/quickstart")` (a typo) asks the Hub for a repository of that name: offline that hangs
for its retries, online it is a 404 that does not mention the folder; and a Hub repository loaded with
`trust_remote_code=True` runs whatever code it holds now. `resolve_model_location` removes both surprises:

* ``outputs/quickstart/model``, ``./model``, ``~/model``, ``/abs/model``: a local folder. Any value without the
  ``hf://`` prefix is one; if it does not exist the error names it and nothing is asked of the network.
* ``hf://org/name@<40-hex commit>``: that Hub repository at that commit. Its code runs
  (``trust_remote_code``) only at a pinned commit: a branch or tag can be moved to other code after you read it.
  ``hf://org/name`` or ``hf://org/name@main`` is accepted for weights alone (``trust_remote_code=False``).
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_PREFIX = "hf://"
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_model_location(value, trust_remote_code: bool = True, base=None) -> tuple[str, dict]:
    """`(name_or_path, from_pretrained kwargs)` for a checkpoint named by `value` (see the module docstring).

        location, options = resolve_model_location(path)
        model = AutoModel.from_pretrained(location, **options)

    A relative folder is taken relative to `base` when given (config values: the repository root), else to the
    working directory. The kwargs hold `trust_remote_code`, and `local_files_only=True` for a folder or the pinned
    `revision` for the Hub. Raises `FileNotFoundError` naming a missing folder (or a file given as one) and
    `ValueError` for a malformed Hub reference or remote code without a pinned commit.
    """
    value = str(value)
    if value.startswith(HUB_PREFIX):
        return _hub_location(value, trust_remote_code)
    folder = Path(value).expanduser()
    if base is not None and not folder.is_absolute():
        folder = Path(base) / folder
    if not folder.exists():
        where = f" ({folder})" if str(folder) != value else ""
        raise FileNotFoundError(
            f"{value}: no such model folder{where}; for a Hugging Face Hub repository write "
            f"{HUB_PREFIX}org/name@<commit>")
    if not folder.is_dir():
        raise FileNotFoundError(f"{value}: is a file; give the model folder (it holds config.json)")
    return str(folder), {"trust_remote_code": trust_remote_code, "local_files_only": True}


def _hub_location(value: str, trust_remote_code: bool) -> tuple[str, dict]:
    repo_id, _, revision = value[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.fullmatch(repo_id) or (revision == "" and "@" in value):
        raise ValueError(f"{value}: not a Hub reference; write {HUB_PREFIX}org/name@<commit>")
    if trust_remote_code and not COMMIT.fullmatch(revision):
        raise ValueError(
            f"{value}: a Hub model's code runs only at a pinned commit (a branch or tag can change); write "
            f"{HUB_PREFIX}{repo_id}@<40-character commit hash> (the repository's 'Files and versions' history)")
    return repo_id, {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
