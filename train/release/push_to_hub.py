"""Upload an Anatomy-VLM checkpoint folder to the Hugging Face Hub: weights, processor, model code and card.

    python -m train.release.push_to_hub --model outputs/quickstart/model --repo-id you/anatomy-vlm
                                [--eval outputs/quickstart/eval.json] [--private] [--dry-run]

1. checks the folder holds what `AutoModel.from_pretrained(repo, trust_remote_code=True)` needs: config.json,
   the weights, every code file named in the ``auto_map`` of config.json / processor_config.json and the files
   they import (``from .sibling import X``), the processor and tokenizer files;
2. writes the model card ``README.md`` with `train.release.model_card` (from the config, ``train_config.yaml`` next to
   the folder and the evaluation JSON) and validates it offline;
3. `HfApi.create_repo` (``exist_ok``) and `HfApi.upload_folder`, with the same ignore patterns as the listing.
   Authentication is huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``).

``--dry-run`` lists the files that would be uploaded with their sizes, writes the card to a temporary folder
and validates it there (the checkpoint folder is left as it is), and makes no network call: no `HfApi` is made.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path


from train.release.model_card import CARD_NAME, validate_card, write_card

# Training leftovers that never belong in a model repo (on top of huggingface_hub's own .git / .cache ignores).
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "*.tmp", "*.pyc", "__pycache__/*", "**/__pycache__/**",
                   "logs/*", "logs/**"]


def ignore_patterns() -> list[str]:
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

    return IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS)


def upload_plan(model_dir) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) of every file `upload_folder` would send, with the same filtering."""
    from huggingface_hub.utils import filter_repo_objects

    model_dir = Path(model_dir).resolve()
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.glob("**/*") if p.is_file())
    return [(name, (model_dir / name).stat().st_size)
            for name in filter_repo_objects(files, ignore_patterns=ignore_patterns())]


def auto_map_modules(node) -> set[str]:
    """Module names in every ``auto_map`` of a JSON tree ("modeling_anatomy_vlm.AnatomyVLMModel" -> its module)."""
    modules = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "auto_map":
                modules |= auto_map_modules(value)
                continue
            for reference in value.values():  # "module.Class", "repo--module.Class", or a [slow, fast] pair
                for name in reference if isinstance(reference, (list, tuple)) else [reference]:
                    if name:
                        modules.add(name.split("--")[-1].split(".")[0])
    return modules


def required_files(model_dir) -> list[str]:
    """What loading with trust_remote_code needs; code files follow the auto_maps and their relative imports."""
    model_dir = Path(model_dir)
    required = ["config.json", "processor_config.json"]
    modules = set()
    for name in ("config.json", "processor_config.json"):
        if (model_dir / name).is_file():
            modules |= auto_map_modules(json.loads((model_dir / name).read_text()))
    pending = sorted(modules)
    while pending:  # the shipped files import each other only as `from .sibling import X`
        module = pending.pop()
        path = model_dir / f"{module}.py"
        if path.is_file():
            for sibling in re.findall(r"^\s*from \.(\w+) import", path.read_text(), flags=re.MULTILINE):
                if sibling not in modules:
                    modules.add(sibling)
                    pending.append(sibling)
    required += sorted(f"{module}.py" for module in modules)
    if (model_dir / "model.safetensors.index.json").is_file():
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        required += ["model.safetensors.index.json", *sorted(set(index["weight_map"].values()))]
    else:
        required.append("model.safetensors")
    required.append("tokenizer.json" if (model_dir / "tokenizer.json").is_file() else "vocab.txt")
    return required


def check_folder(model_dir, planned: list[str]) -> None:
    missing = [name for name in required_files(model_dir) if name not in planned]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a complete checkpoint, missing {missing} (save it with "
                                "model.save_pretrained(d); processor.save_pretrained(d))")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def push(model_dir, repo_id: str, eval_json=None, private: bool = False, dry_run: bool = False,
         commit_message: str = "Upload Anatomy-VLM checkpoint", revision: str | None = None) -> dict:
    """Upload `model_dir` to `repo_id` (see the module docstring); returns the plan and, when uploaded, the URL."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; give a checkpoint folder")
    if dry_run:
        card_dir = Path(tempfile.mkdtemp(prefix="anatomy_vlm_card_"))
        card_path = write_card(model_dir, eval_json, repo_id, path=card_dir / CARD_NAME)
        plan = [(name, size) for name, size in upload_plan(model_dir) if name != CARD_NAME]
        plan = sorted(plan + [(CARD_NAME, card_path.stat().st_size)])
    else:
        card_path = write_card(model_dir, eval_json, repo_id)
        plan = upload_plan(model_dir)
    check_folder(model_dir, [name for name, _ in plan])
    result = {"repo_id": repo_id, "files": plan, "card": str(card_path), "card_summary": validate_card(card_path),
              "total_bytes": sum(size for _, size in plan), "url": None}
    if dry_run:
        return result

    from huggingface_hub import HfApi

    api = HfApi()
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), commit_message=commit_message,
                               ignore_patterns=ignore_patterns(), revision=revision, repo_type="model")
    result["url"] = getattr(commit, "commit_url", None) or str(repo_url)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (model + processor)")
    parser.add_argument("--repo-id", required=True, help="e.g. you/anatomy-vlm")
    parser.add_argument("--eval", help="evaluation JSON for the card (default: found next to the model folder)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (default: main)")
    parser.add_argument("--message", default="Upload Anatomy-VLM checkpoint", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="list files and validate the card; no network")
    args = parser.parse_args(argv)
    result = push(args.model, args.repo_id, args.eval, args.private, args.dry_run, args.message, args.revision)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(result['files'])} files ({_size(result['total_bytes'])}) to {args.repo_id}:")
    for name, size in result["files"]:
        print(f"  {name:<40} {_size(size):>10}")
    summary = result["card_summary"]
    print(f"model card {result['card']}: valid, model-index with {summary['num_results']} results")
    if result["url"]:
        print(result["url"])
    return result


if __name__ == "__main__":
    main()
