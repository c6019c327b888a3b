"""Chest ImaGenome (silver scene graphs) + MIMIC-CXR-JPG images -> `datasets.Dataset` (schema: `train.data.common`).

The phantom set is written in these layouts and read here too, so one code path serves both::

    load_imagenome("data/phantom-quickstart", split="train",            # root holding both folders below
                   region_names=config.region_names, findings=config.findings)
    load_imagenome(split="test", region_names=..., findings=...,
                   imagenome_dir="chest-imagenome/1.0.0",            # holds silver_dataset/
                   mimic_cxr_jpg_dir="mimic-cxr-jpg/2.0.0",          # holds files/ and the metadata CSV
                   reports_dir="mimic-cxr/2.0.0")                   # optional: holds files/pXX/pN/sM.txt

Rows come from ``silver_dataset/splits/{train,valid,test}.csv``; the image is the MIMIC-CXR-JPG file named by its
``path`` column (``.dcm`` -> ``.jpg``). Boxes are the objects' ``original_x1..original_y2`` (pixels of the original
image). In the objects, ``original_width`` / ``original_height`` are the BOX's width and height
(``original_x2 - original_x1``), not the image's: the image size comes from ``Rows`` / ``Columns`` of
``mimic-cxr-2.0.0-metadata.csv`` (or the JPEG header when the table lacks the image). Boxes sticking out of the
image are clipped, boxes left without area are dropped (NaN, masked in the loss), and the counts are logged.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np

from modeling_anatomy_vlm import AnatomyVLMConfig
from train.data import mimic
from train.data.common import (
    DataProblems, cached_dataset, clean_boxes, features, file_signature, label_arrays, phrase_rows,
)
from train.data.tables import read_rows
from train.text.region_texts import scene_graph_region_phrases
from train.text.vocabulary import parse_attribute

SPLIT_FILES = {"train": "train", "validate": "valid", "valid": "valid", "val": "valid", "test": "test"}
PARSE_CHUNK = 64  # scene graphs per task sent to a worker process
CHUNKS_AHEAD = 4  # tasks per worker submitted and not yet written: bounds the rows held in memory


def _parse_one(args) -> tuple[dict | None, list[tuple[str, str, str]], dict]:
    """One split row -> (dataset row or None, problems [(kind, path, message)], counts). Runs in workers."""
    (entry, jpg, scene_graph_path, report_path, size, region_names, findings) = args
    problems, counts = [], {}
    if not jpg.is_file():
        return None, [("image missing", str(jpg), "image file not found")], counts
    try:
        graph = json.loads(scene_graph_path.read_text())
        if not isinstance(graph, dict) or not isinstance(graph.get("objects"), list):
            raise ValueError("no 'objects' list")
        region_phrases = scene_graph_region_phrases(graph, region_names)
        names = set(region_names)
        extra = []  # facts about the boxes the model ignores still count for the image-level labels
        for item in graph.get("attributes", []):
            if item.get("bbox_name") not in names:
                for attributes in item.get("attributes", []):
                    extra.extend(parse_attribute(attribute) for attribute in attributes)
    except FileNotFoundError:
        return None, [("scene graph missing", str(scene_graph_path), "scene graph file not found")], counts
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        return None, [("scene graph malformed", str(scene_graph_path), f"malformed scene graph ({error})")], counts
    if size is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(jpg) as image:  # reads the header only
                size = (image.height, image.width)
        except (OSError, UnidentifiedImageError) as error:
            return None, [("image unreadable", str(jpg), f"not a readable image ({error})")], counts
    height, width = size

    boxes = np.full((len(region_names), 4), np.nan, dtype=np.float32)
    index = {name: i for i, name in enumerate(region_names)}
    united = 0
    for obj in graph["objects"]:
        i = index.get(obj.get("bbox_name"))
        if i is None:
            continue
        try:
            box = np.array([float(obj[k]) for k in ("original_x1", "original_y1", "original_x2", "original_y2")])
        except (KeyError, TypeError, ValueError):
            problems.append(("box unreadable", str(scene_graph_path), f"object {obj.get('bbox_name')!r} has no "
                                                                       "numeric original_x1..original_y2"))
            continue
        if not np.isnan(boxes[i]).any():  # a region named twice: the box covering both, not the last one read
            box = np.concatenate([np.minimum(boxes[i][:2], box[:2]), np.maximum(boxes[i][2:], box[2:])])
            united += 1
        boxes[i] = box
    local = DataProblems("row", "skip")
    boxes = clean_boxes(boxes, width, height, local)
    counts = dict(local.counts)
    if united:
        counts["duplicate region boxes united"] = united
    region_labels, global_labels = label_arrays(region_phrases, findings, region_names, extra)
    report = ""
    if report_path is not None and report_path.is_file():
        report = report_path.read_text(errors="replace")
    row = {
        "image": str(jpg),
        "image_id": entry["dicom_id"],
        "study_id": str(entry.get("study_id", "")),
        "subject_id": str(entry.get("subject_id", "")),
        "split": entry["split"],
        "report": report,
        "width": width,
        "height": height,
        "boxes": boxes,
        "region_phrases": phrase_rows(region_phrases),
        "region_labels": region_labels,
        "global_labels": global_labels.tolist(),
        "mesh": [],
    }
    return row, problems, counts


def load_imagenome(
    root=None,
    split: str = "train",
    *,
    imagenome_dir=None,
    mimic_cxr_jpg_dir=None,
    reports_dir=None,
    region_names: Sequence[str],
    findings: Sequence[str],
    skip_images_to_avoid: bool = True,
    on_error: str = "skip",
    max_images: int | None = None,
    num_proc: int = 1,
    cache_dir=None,
    overwrite_cache: bool = False,
):
    """Chest ImaGenome split as a `datasets.Dataset` (columns in `train.data.common`), Arrow-cached.

    Args:
        root: a folder holding ``chest-imagenome/``, ``mimic-cxr-jpg/`` and optionally ``mimic-cxr-reports/``
            (the phantom layout); or give the three folders separately.
        split: ``train``, ``validate`` (``valid``) or ``test``.
        skip_images_to_avoid: drop the images in ``splits/images_to_avoid.csv`` (the gold-standard images).
        on_error: ``"skip"`` counts and logs bad rows (missing image, missing or malformed scene graph);
            ``"raise"`` stops at the first one with a `ValueError` naming the file.
        max_images: keep the first N rows of the split (quick experiments).
        num_proc: worker processes for parsing scene graphs on the first load. Their rows stream, in split order,
            into the Arrow file (`cached_dataset`): a few hundred rows are in memory at a time, not the split.
    """
    if root is not None:
        root = Path(root)
        imagenome_dir = imagenome_dir or root / "chest-imagenome"
        mimic_cxr_jpg_dir = mimic_cxr_jpg_dir or root / "mimic-cxr-jpg"
        if reports_dir is None and (root / "mimic-cxr-reports").is_dir():
            reports_dir = root / "mimic-cxr-reports"
    if imagenome_dir is None or mimic_cxr_jpg_dir is None:
        raise ValueError("load_imagenome: give `root`, or both `imagenome_dir` and `mimic_cxr_jpg_dir`")
    silver = Path(imagenome_dir) / "silver_dataset"
    mimic_dir = Path(mimic_cxr_jpg_dir)
    if split not in SPLIT_FILES:
        raise ValueError(f"load_imagenome: unknown split {split!r}; use one of train, validate, test")
    split_csv = silver / "splits" / f"{SPLIT_FILES[split]}.csv"
    for path, what in ((silver, "Chest ImaGenome silver_dataset folder"), (split_csv, "split table"),
                       (silver / "scene_graph", "scene_graph folder (unzip scene_graph.zip)"),
                       (mimic_dir / "files", "MIMIC-CXR-JPG files/ folder")):
        if not path.exists():
            raise FileNotFoundError(f"load_imagenome: {path}: {what} not found")
    avoid_csv = silver / "splits" / "images_to_avoid.csv"
    split_name = "validate" if SPLIT_FILES[split] == "valid" else split
    key = {
        "split": split_name, "silver": str(silver.resolve()), "mimic": str(mimic_dir.resolve()),
        "reports": str(Path(reports_dir).resolve()) if reports_dir else None,
        "regions": list(region_names), "findings": list(findings), "avoid": skip_images_to_avoid,
        "max_images": max_images, "on_error": on_error,
        "sources": [file_signature(p) for p in (split_csv, avoid_csv, silver / "scene_graph",
                                                 mimic.metadata_table(mimic_dir) or "none")],
    }

    def build():
        problems = DataProblems(f"imagenome[{split_name}]", on_error)
        entries = read_rows(split_csv)
        if entries and "dicom_id" not in entries[0]:
            raise ValueError(f"{split_csv}: no dicom_id column (columns: {list(entries[0])})")
        if skip_images_to_avoid and avoid_csv.is_file():
            avoid = {row["dicom_id"] for row in read_rows(avoid_csv)}
            kept = [e for e in entries if e["dicom_id"] not in avoid]
            problems.count("images_to_avoid skipped", len(entries) - len(kept))
            entries = kept
        if max_images is not None:
            entries = entries[:max_images]
        sizes = mimic.image_sizes(mimic_dir, {entry["dicom_id"] for entry in entries})
        regions, names = tuple(region_names), tuple(findings)

        def jobs():  # made as the workers need them: only the split table's rows stay in memory
            for entry in entries:
                entry = {**entry, "split": split_name}
                report = None
                if reports_dir is not None:
                    report = mimic.report_path(Path(reports_dir), entry["subject_id"], entry["study_id"])
                scene_graph = silver / "scene_graph" / f"{entry['dicom_id']}_SceneGraph.json"
                yield (entry, mimic.jpg_path_of_row(mimic_dir, entry), scene_graph, report,
                       sizes.get(entry["dicom_id"]), regions, names)

        def rows():
            from tqdm import tqdm

            bar = dict(total=len(entries), desc=f"imagenome[{split_name}] index", unit="img", mininterval=2.0,
                       disable=len(entries) < 2000)
            if num_proc > 1 and len(entries) > 256:
                with ProcessPoolExecutor(num_proc) as pool:
                    yield from _collect(tqdm(_ordered_map(pool, jobs(), num_proc), **bar), problems)
            else:
                yield from _collect(tqdm(map(_parse_one, jobs()), **bar), problems)

        return rows(), problems

    return cached_dataset(f"imagenome-{split_name}", key, build, features(len(region_names), len(findings)),
                          cache_dir=cache_dir, overwrite=overwrite_cache)


def _collect(results, problems: DataProblems):
    """Yields the rows of `_parse_one` results, counting their problems in `problems` as they pass."""
    for row, row_problems, counts in results:
        for kind, path, message in row_problems:
            problems.problem(kind, path, message)
        for kind, n in counts.items():
            problems.count(kind, n)
        if row is not None:
            yield row


def _parse_chunk(jobs: list) -> list:
    return [_parse_one(job) for job in jobs]


def _ordered_map(pool, jobs, num_proc: int):
    """`_parse_one` over `jobs` in `pool`, results in order, `PARSE_CHUNK` jobs per task, with at most
    `CHUNKS_AHEAD` tasks per worker submitted and not yet consumed. (`Executor.map` submits every job at once, so
    when the consumer -- here the Arrow writer -- is slower than the workers, finished results pile up in memory.)"""
    jobs, chunksize, ahead = iter(jobs), PARSE_CHUNK, CHUNKS_AHEAD
    pending: deque = deque()

    def submit() -> bool:
        chunk = list(islice(jobs, chunksize))
        if chunk:
            pending.append(pool.submit(_parse_chunk, chunk))
        return bool(chunk)

    while len(pending) < ahead * num_proc and submit():
        pass
    try:
        while pending:
            results = pending.popleft().result()
            submit()
            yield from results
    finally:
        for future in pending:  # stopped early (an error, or the consumer gave up): drop the rest
            future.cancel()


def main(argv=None) -> None:
    """Index a split (and fill the Arrow cache); prints the counts and the time taken."""
    import argparse
    import logging
    import time

    parser = argparse.ArgumentParser(description="Index a Chest ImaGenome + MIMIC-CXR-JPG split into the Arrow cache.")
    parser.add_argument("--root", help="folder holding chest-imagenome/ and mimic-cxr-jpg/ (phantom layout)")
    parser.add_argument("--imagenome-dir")
    parser.add_argument("--mimic-cxr-jpg-dir")
    parser.add_argument("--reports-dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite-cache", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    defaults = AnatomyVLMConfig()  # the default regions and findings
    dataset = load_imagenome(args.root, args.split, region_names=defaults.region_names, findings=defaults.findings,
                             imagenome_dir=args.imagenome_dir,
                             mimic_cxr_jpg_dir=args.mimic_cxr_jpg_dir, reports_dir=args.reports_dir,
                             num_proc=args.num_proc, overwrite_cache=args.overwrite_cache)
    seconds = time.perf_counter() - start
    print(f"{len(dataset)} images in {seconds:.1f} s ({1e4 * seconds / max(1, len(dataset)):.1f} s per 10k images)")


if __name__ == "__main__":
    main()
