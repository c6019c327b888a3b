"""Remote-code compatibility: a saved checkpoint under the oldest and the newest transformers it claims to support.

    make compat                                  # = python -m train.release.compat
    python -m train.release.compat --versions 5.0.0 latest --work outputs/compat

1. Saves a tiny randomly initialised checkpoint (`save_pretrained`, the model code copied in) and a test image.
2. Runs `PROBE` on it: in a fresh interpreter where this project cannot be imported, load the checkpoint with
   `trust_remote_code=True`, run `interpret` and the three pipelines (`pipeline(task, model=checkpoint,
   trust_remote_code=True)`), write their outputs as JSON. First under the pinned transformers (this venv), then
   under each version asked for, each in a venv of its own, `.cache/compat/transformers-<version>/`: transformers
   and its dependencies are installed there from PyPI, then a `.pth` file appends this venv's site-packages, so the
   installed transformers (and its huggingface-hub, tokenizers, ...) shadow the pinned ones while torch, pillow,
   pydicom and the rest come from here, nothing reinstalled. `latest` is the newest release on PyPI.
3. Checks that each run's pipelines give its own `interpret`'s numbers and that each version gives the pinned
   version's numbers: scores within 1e-5, boxes within 0.5 px. Prints one line per version and exits 1 on any
   difference or failure.

The supported range is `[tool.anatomy-vlm] remote-code-transformers` in pyproject.toml; its lower bound is the
default oldest version tried. The venvs are kept between runs (an existing one is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import venv
from pathlib import Path

from train.config import REPO_ROOT

SCORE_ATOL = 1e-5
BOX_ATOL = 0.5
FINDINGS = ["pleural effusion", "rib fracture", "enlarged cardiac silhouette"]
VENV_ROOT = REPO_ROOT / ".cache" / "compat"

# The pipelines and the call each gets: every (region, finding) pair from detection, region embeddings too.
PIPELINE_CALLS = {
    "zero-shot-image-classification": {"candidate_labels": FINDINGS},
    "zero-shot-object-detection": {"candidate_labels": FINDINGS, "threshold": 0.0},
    "image-feature-extraction": {"regions": True},
}

# Run as `python -c PROBE <checkpoint> <image> <out.json> <calls JSON>` in the interpreter under test.
PROBE = """
import importlib.abc, json, sys

class BlockProject(importlib.abc.MetaPathFinder):
    # Only the code copied into the checkpoint may serve trust_remote_code.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_anatomy_vlm", "train"):
            raise ImportError(f"{name} is blocked: the checkpoint must load without this project")

sys.meta_path.insert(0, BlockProject())

import transformers
from transformers import AutoModel, AutoProcessor, pipeline

checkpoint, image, out_path, calls = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
findings = calls["zero-shot-image-classification"]["candidate_labels"]
result = {
    "transformers": transformers.__version__,
    "model_module": type(model).__module__,
    "interpret": model.interpret(image, processor, findings=findings)[0],
    "pipelines": {},
}
for task, kwargs in calls.items():
    pipe = pipeline(task, model=checkpoint, trust_remote_code=True)
    result["pipelines"][task] = {"class": type(pipe).__name__, "module": type(pipe).__module__,
                                 "output": pipe(image, **kwargs)}
json.dump(result, open(out_path, "w"))
"""


def run_probe(python, checkpoint, image, out_path, timeout: int = 600) -> dict:
    """Run `PROBE` with `python` (offline, outside the repository, no PYTHONPATH); returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [str(python), "-c", PROBE, str(checkpoint), str(image), str(out_path), json.dumps(PIPELINE_CALLS)],
        cwd=Path(out_path).parent, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if completed.returncode:
        raise RuntimeError(f"probe failed under {python}:\n{completed.stderr[-4000:]}")
    return json.loads(Path(out_path).read_text())


def _close(a, b, atol: float) -> bool:
    return abs(a - b) <= atol


def pipeline_mismatches(result: dict) -> list[str]:
    """Where a probe's pipelines disagree with its own `interpret` (empty when they agree)."""
    interpret, pipelines, problems = result["interpret"], result["pipelines"], []
    classification = {r["label"]: r["score"] for r in pipelines["zero-shot-image-classification"]["output"]}
    if classification.keys() != interpret["findings"].keys():
        problems.append(f"zero-shot-image-classification labels {sorted(classification)}")
    problems += [f"zero-shot-image-classification {label}: {score} vs interpret {interpret['findings'][label]}"
                 for label, score in classification.items()
                 if label in interpret["findings"] and not _close(score, interpret["findings"][label], SCORE_ATOL)]
    detections = {(r["region"], r["label"]): r for r in pipelines["zero-shot-object-detection"]["output"]}
    for region in interpret["regions"]:
        for finding, score in region["scores"].items():
            found = detections.pop((region["name"], finding), None)
            if found is None:
                problems.append(f"zero-shot-object-detection: no result for ({region['name']}, {finding})")
                continue
            box = [found["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
            if not _close(found["score"], score, SCORE_ATOL):
                problems.append(f"zero-shot-object-detection ({region['name']}, {finding}): "
                                f"{found['score']} vs {score}")
            if not all(_close(a, b, BOX_ATOL) for a, b in zip(box, region["box"])):
                problems.append(f"zero-shot-object-detection {region['name']} box {box} vs {region['box']}")
    problems += [f"zero-shot-object-detection: unexpected result {key}" for key in detections]
    features = pipelines["image-feature-extraction"]["output"]
    if features["region_names"] != [region["name"] for region in interpret["regions"]]:
        problems.append("image-feature-extraction region_names differ from interpret's regions")
    return problems


def _flat(nested) -> list[float]:
    return [v for item in nested for v in _flat(item)] if isinstance(nested, list) else [nested]


def output_mismatches(reference: dict, result: dict) -> list[str]:
    """Where `result` (a probe under one transformers) differs from `reference` (under another)."""
    problems = []
    ref, got = reference["interpret"], result["interpret"]
    if got["image_size"] != ref["image_size"]:
        problems.append(f"interpret image_size {got['image_size']} vs {ref['image_size']}")
    for finding, score in ref["findings"].items():
        if not _close(got["findings"].get(finding, float("nan")), score, SCORE_ATOL):
            problems.append(f"interpret finding {finding}: {got['findings'].get(finding)} vs {score}")
    if [r["name"] for r in got["regions"]] != [r["name"] for r in ref["regions"]]:
        problems.append("interpret regions differ")
    for theirs, ours in zip(got["regions"], ref["regions"]):
        if not all(_close(a, b, BOX_ATOL) for a, b in zip(theirs["box"], ours["box"])):
            problems.append(f"interpret region {ours['name']}: box {theirs['box']} vs {ours['box']}")
        problems += [f"interpret ({ours['name']}, {f}): {theirs['scores'].get(f)} vs {s}"
                     for f, s in ours["scores"].items()
                     if not _close(theirs["scores"].get(f, float("nan")), s, SCORE_ATOL)]
    for key in ("image_embeds", "region_embeds"):
        a = _flat(reference["pipelines"]["image-feature-extraction"]["output"][key])
        b = _flat(result["pipelines"]["image-feature-extraction"]["output"][key])
        if len(a) != len(b) or not all(_close(x, y, SCORE_ATOL) for x, y in zip(a, b)):
            problems.append(f"image-feature-extraction {key} differ by more than {SCORE_ATOL}")
    return problems + pipeline_mismatches(result)


def make_checkpoint(work: Path) -> tuple[Path, Path]:
    """A tiny randomly initialised checkpoint (64 px ViT, the embedded MiniLM) and a 180 x 140 test image."""
    import numpy as np
    import torch
    from PIL import Image

    from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor

    torch.manual_seed(0)
    config = AnatomyVLMConfig(
        vision_config=dict(model_type="vit", image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128),
        projection_dim=32,
    )
    checkpoint = work / "checkpoint"
    AnatomyVLMModel.from_encoders(config).save_pretrained(checkpoint)
    AnatomyVLMProcessor.from_model_config(config).save_pretrained(checkpoint)
    yy, xx = np.mgrid[0:180, 0:140]
    pixels = 200 - 0.3 * yy
    for cx in (40, 100):
        pixels = np.where(((xx - cx) / 25.0) ** 2 + ((yy - 80) / 55.0) ** 2 < 1, 60 + 0.2 * yy, pixels)
    image = work / "cxr.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image)
    return checkpoint, image


def supported_range() -> str:
    """The declared range, `[tool.anatomy-vlm] remote-code-transformers` of pyproject.toml (e.g. ">=5.0.0")."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["anatomy-vlm"]["remote-code-transformers"]


def oldest_supported() -> str:
    match = re.search(r">=\s*([\w.]+)", supported_range())
    if match is None:
        raise ValueError(f"pyproject.toml: remote-code-transformers {supported_range()!r} has no lower bound")
    return match[1]


def latest_release() -> str:
    """The newest transformers on PyPI, as `pip index versions` reports it."""
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                             capture_output=True, text=True, check=True, timeout=120).stdout
    return re.search(r"^transformers \(([^)]+)\)", listing, flags=re.MULTILINE)[1]


def version_python(version: str) -> Path:
    """The interpreter of a venv with transformers==`version` in front of this venv's packages (made once)."""
    root = VENV_ROOT / f"transformers-{version}"
    python = root / "bin" / "python"
    stamp = root / ".ready"
    if stamp.is_file():
        return python
    venv.EnvBuilder(clear=True, with_pip=True).create(root)
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"transformers=={version}"], capture_output=True, text=True, timeout=900)
    if install.returncode:
        raise RuntimeError(f"pip install transformers=={version} failed:\n{install.stderr[-4000:]}")
    # After the install, so pip resolves transformers' own dependencies into this venv (they shadow ours).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "anatomy_vlm_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    stamp.touch()
    return python


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="*", default=None,
                        help="transformers versions to try besides the pinned one; 'latest' = newest on PyPI "
                             "(default: the declared oldest and latest)")
    parser.add_argument("--work", help="folder for the checkpoint and outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    versions = args.versions if args.versions is not None else [oldest_supported(), "latest"]
    versions = [latest_release() if v == "latest" else v for v in versions]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="anatomy_vlm_compat_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checkpoint, image = make_checkpoint(work)

    import transformers

    reference = run_probe(sys.executable, checkpoint, image, work / "pinned.json")
    failures = [f"pinned {transformers.__version__}: {p}" for p in pipeline_mismatches(reference)]
    print(f"transformers {reference['transformers']} (pinned): "
          f"{'ok' if not failures else f'{len(failures)} differences'} ({time.perf_counter() - start:.0f} s)")
    for version in dict.fromkeys(versions):
        started = time.perf_counter()
        try:
            result = run_probe(version_python(version), checkpoint, image, work / f"transformers-{version}.json")
            problems = output_mismatches(reference, result)
            if result["transformers"] != version:
                problems.insert(0, f"ran transformers {result['transformers']}, not {version}")
        except (RuntimeError, subprocess.SubprocessError) as err:
            problems = [str(err)]
        failures += [f"{version}: {p}" for p in problems]
        status = "ok" if not problems else f"FAILED, {len(problems)} differences"
        print(f"transformers {version}: {status} ({time.perf_counter() - started:.0f} s)")
    for failure in failures[:50]:
        print("  " + failure)
    print(f"supported range {supported_range()}; {time.perf_counter() - start:.0f} s in all; outputs in {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
