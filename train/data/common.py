"""What every image-text loader shares: the row schema, label arrays, bad-data policy, Arrow cache, transform.

Every loader (Chest ImaGenome + MIMIC-CXR-JPG, IU-Xray; the phantom set is read as Chest ImaGenome) returns a
`datasets.Dataset` with the columns of `features(num_regions, num_findings)`:

* ``image``: `datasets.Image(decode=False)`, i.e. the file path; pixels are decoded lazily by `make_transform`
  through the model's own image loader, so PNG, JPEG and DICOM all work and a corrupt file gets our error.
* ``image_id``, ``study_id``, ``subject_id``, ``split``, ``report`` (full report text, "" when unknown).
* ``width``, ``height``: original image size in pixels.
* ``boxes``: ``[R][4]`` float32 ``(x1, y1, x2, y2)`` in original pixels, NaN rows = region not annotated.
* ``region_phrases``: list of ``{"region", "phrase", "attributes": ["category|yes|label", ...]}``.
* ``region_labels``: ``[R][F]`` int8, 1 = present, 0 = said absent, -1 = not mentioned for that region.
* ``global_labels``: ``[F]`` int8, 1 = present anywhere, 0 = said absent and never present, -1 = not mentioned.
* ``mesh``: list of MeSH tags (IU-Xray; empty elsewhere).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from train.text.vocabulary import parse_attribute

logger = logging.getLogger("anatomy_vlm.data")

ON_ERROR = ("skip", "raise")
_CACHE_VERSION = "2"  # 2: a region named twice in a scene graph gets the union of its boxes


def features(num_regions: int, num_findings: int):
    import datasets

    return datasets.Features({
        "image": datasets.Image(decode=False),
        "image_id": datasets.Value("string"),
        "study_id": datasets.Value("string"),
        "subject_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "report": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "boxes": datasets.Array2D((num_regions, 4), "float32"),
        "region_phrases": datasets.List({
            "region": datasets.Value("string"),
            "phrase": datasets.Value("string"),
            "attributes": datasets.List(datasets.Value("string")),
        }),
        "region_labels": datasets.Array2D((num_regions, num_findings), "int8"),
        "global_labels": datasets.List(datasets.Value("int8"), length=num_findings),
        "mesh": datasets.List(datasets.Value("string")),
    })


class DataProblems:
    """Counts what a loader skipped, clipped or dropped, and applies the skip-or-raise policy.

    `problem(path, message)` raises ``ValueError("{path}: {message}")`` under ``on_error="raise"``; under
    ``"skip"`` it counts the problem and keeps the first examples for the summary `log` prints.
    """

    def __init__(self, name: str, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.name, self.on_error = name, on_error
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def problem(self, kind: str, path, message: str) -> None:
        text = f"{path}: {message}"
        if self.on_error == "raise":
            raise ValueError(text)
        self.count(kind)
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(text)

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}

    def log(self, num_rows: int) -> None:
        summary = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no problems"
        logger.info("%s: %d images; %s", self.name, num_rows, summary)
        for kind, examples in self.examples.items():
            for text in examples:
                logger.warning("%s: %s (%s)", self.name, text, kind)


def clean_boxes(boxes: np.ndarray, width: int, height: int, problems: DataProblems) -> np.ndarray:
    """Clip `[R, 4]` xyxy pixel boxes to the image; boxes left without area become NaN (masked). Counts both."""
    boxes = np.asarray(boxes, dtype=np.float32).copy()
    present = ~np.isnan(boxes).any(axis=1)
    problems.count("boxes missing", int((~present).sum()))
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    moved = present & (np.abs(clipped - boxes) > 1e-3).any(axis=1)
    empty = present & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    problems.count("boxes clipped", int((moved & ~empty).sum()))
    problems.count("boxes dropped (no area)", int(empty.sum()))
    clipped[empty] = np.nan
    return clipped


def label_arrays(
    region_phrases: dict[str, list[tuple[str, list[tuple[str, bool, str]]]]],
    findings: Sequence[str],
    region_names: Sequence[str],
    extra_triples: Iterable[tuple[str, bool, str]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Region labels ``[R, F]`` and global labels ``[F]`` (1 / 0 / -1 as in the module docstring).

    `region_phrases` is `train.text.region_texts.RegionPhrases`; `extra_triples` adds (category, present, label) facts
    that count for the image but belong to no modelled region (e.g. Chest ImaGenome's 7 ignored boxes).
    """
    column = {f: j for j, f in enumerate(findings)}
    row = {r: i for i, r in enumerate(region_names)}
    region = np.full((len(region_names), len(findings)), -1, dtype=np.int8)
    global_ = np.full(len(findings), -1, dtype=np.int8)

    def mark(target: np.ndarray, index, present: bool) -> None:
        target[index] = 1 if present else max(int(target[index]), 0)  # present wins over absent

    for name, entries in region_phrases.items():
        for _, triples in entries:
            for _, present, label in triples:
                if label in column:
                    if name in row:
                        mark(region, (row[name], column[label]), present)
                    mark(global_, column[label], present)
    for _, present, label in extra_triples:
        if label in column:
            mark(global_, column[label], present)
    return region, global_


def phrase_rows(region_phrases) -> list[dict]:
    """`RegionPhrases` -> the ``region_phrases`` column value."""
    return [
        {"region": region, "phrase": phrase, "attributes": [f"{c}|{'yes' if p else 'no'}|{l}" for c, p, l in triples]}
        for region, entries in region_phrases.items()
        for phrase, triples in entries
    ]


def region_phrases_of(row_value: list[dict]):
    """The ``region_phrases`` column value -> `RegionPhrases` (what `train.text.region_texts.region_texts_for_image` takes)."""
    result: dict[str, list] = {}
    for item in row_value:
        triples = [parse_attribute(attribute) for attribute in item["attributes"]]
        result.setdefault(item["region"], []).append((item["phrase"], triples))
    return result


# --------------------------------------------------------------------------------------------- Arrow cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("ANATOMY_VLM_CACHE", Path.home() / ".cache" / "anatomy_vlm")) / "datasets"


def file_signature(path) -> str:
    """What a cache key needs to see any change to a source: a file's size and mtime; for a folder, a digest of
    every file's (relative path, size, mtime_ns) under it, so a file edited in place is seen, not only one added or
    removed. No file is read: one `os.scandir` walk and a stat per file (240k files: about 1.2 s on a local disk
    with its metadata cached, flat or in nested folders).
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISDIR(st.st_mode):
        return f"{st.st_size}:{st.st_mtime_ns}"
    lines: list[str] = []
    _list_tree(Path(path), "", lines, {(st.st_dev, st.st_ino)})
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return f"{len(lines)} files:{digest}"


def _list_tree(folder: Path, prefix: str, lines: list[str], seen: set) -> None:
    """Appends `prefix/name size mtime_ns` of every file under `folder` to `lines`, in name order. Symbolic links
    are followed (a dataset folder often links to another disk); `seen` stops a link loop."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:  # a dangling link
            lines.append(f"{prefix}{entry.name} missing")
            continue
        if not stat.S_ISDIR(st.st_mode):
            lines.append(f"{prefix}{entry.name} {st.st_size} {st.st_mtime_ns}")
        elif (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            _list_tree(Path(entry.path), f"{prefix}{entry.name}/", lines, seen)


def cached_dataset(name: str, key: dict, build: Callable[[], tuple[Iterable[dict], DataProblems]], feats,
                   cache_dir=None, overwrite: bool = False, batch_size: int = 1000):
    """Load the Arrow copy of a loader's table keyed by `key` (arguments + source file signatures), or build it.

    The first load parses the sources (slow: JSON / XML per image); later loads memory-map the Arrow file.
    `build()` returns ``(rows, problems)``: `rows` is a list or any iterable of row dicts (the columns of `feats`);
    a generator is consumed once, while the rows are written, and may go on filling `problems` until it ends. The
    rows go to the Arrow file `batch_size` at a time, so a streamed table is never whole in memory. The cache is
    written as ``{name}-{digest}.tmp`` and renamed when complete: a build that raises, or is killed, leaves no
    folder with the final name (the next build removes the leftover ``.tmp``).
    """
    import shutil

    import datasets

    digest = hashlib.sha256(json.dumps({"v": _CACHE_VERSION, **key}, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{digest[:16]}"
    stats_path = path / "anatomy_vlm_stats.json"
    if path.is_dir() and stats_path.is_file() and not overwrite:
        dataset = datasets.load_from_disk(str(path))
        logger.info("%s: loaded %d rows from the Arrow cache %s", name, len(dataset), path)
        return dataset.cast_column("image", feats["image"])
    # Paths are stored as strings: an Image column would copy every image's bytes into the cache.
    stored = datasets.Features({**feats, "image": datasets.Value("string")})
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():  # left by a build that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rows = None
    try:
        rows, problems = build()
        num_rows = _write_arrow_folder(tmp, rows, stored, digest, batch_size)
        problems.log(num_rows)
        if not num_rows:
            raise ValueError(f"{name}: no usable images ({problems.as_dict()['counts']}); check the paths")
        (tmp / "anatomy_vlm_stats.json").write_text(json.dumps(problems.as_dict(), indent=2))
    except BaseException:
        if hasattr(rows, "close"):  # a generator stopped midway: let it release its workers now
            rows.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # only complete caches ever carry the final name
    return datasets.load_from_disk(str(path)).cast_column("image", feats["image"])


def _write_arrow_folder(folder: Path, rows: Iterable[dict], stored, fingerprint: str, batch_size: int) -> int:
    """Writes `rows` into `folder` as `Dataset.save_to_disk` lays a dataset out (one Arrow file, ``state.json``,
    ``dataset_info.json``: what `datasets.load_from_disk` reads), `batch_size` rows at a time; returns the row count.
    The Arrow file is written by `datasets.arrow_writer.ArrowWriter`, as `save_to_disk` writes its shards."""
    from dataclasses import asdict

    import datasets
    from datasets.arrow_writer import ArrowWriter

    filename = "data-00000-of-00001.arrow"
    columns = list(stored)
    num_rows = 0
    writer = ArrowWriter(features=stored, path=str(folder / filename), writer_batch_size=batch_size)
    try:
        batch: dict[str, list] = {column: [] for column in columns}
        for row in rows:
            for column in columns:
                batch[column].append(row[column])
            num_rows += 1
            if num_rows % batch_size == 0:
                writer.write_batch(batch)
                batch = {column: [] for column in columns}
        if num_rows % batch_size:
            writer.write_batch(batch)
        writer.finalize()
    finally:
        writer.close()
    if not num_rows:
        return 0
    info = asdict(datasets.Dataset.from_file(str(folder / filename)).info)  # the features, as the file records them
    state = {"_data_files": [{"filename": filename}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    return num_rows


# --------------------------------------------------------------------------------------------- transform
def make_transform(processor, on_error: str = "skip", prepared_dir=None) -> Callable[[dict], dict]:
    """A `Dataset.set_transform` function: decodes images with the model's loader and resizes them.

    Adds ``pixels`` [1, S, S] uint8 (resized and padded, not normalised: `AnatomyVLMImageProcessor.normalize_pixels`
    finishes them on the device), ``original_sizes`` [2] (H, W), ``target_boxes`` [R, 4] (normalised cx, cy, w, h;
    the pixel ``boxes`` stay) and ``box_mask`` [R]. With `prepared_dir` (a store written by `train.data.prepare`)
    images are read from its shards when it holds them unchanged, else decoded from their files. An image that
    cannot be read raises under ``on_error="raise"``; under ``"skip"`` it yields ``image_ok = False`` (zero pixels)
    so the collator can drop it and count it.
    """
    import torch

    from modeling_anatomy_vlm.image_processing_anatomy_vlm import ImageLoadError, load_grayscale

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    prepared = None
    if prepared_dir is not None:
        from train.data.prepare import PreparedImages

        prepared = PreparedImages.open(prepared_dir)
        if prepared.size < size:
            raise ValueError(f"data.prepared_dir: {prepared_dir} holds images of long side {prepared.size} px, smaller "
                             f"than the model's {size} px input; prepare them again with --size {size} or more")

    lookups = Counter()  # per process: a store that serves few images is slow, not wrong, so it is only told

    def load(image: dict):
        """(grayscale [H', W'] uint8 or float, original (H, W)) of one ``image`` column value."""
        if image["bytes"] is not None:
            gray = load_grayscale(Image.open(io.BytesIO(image["bytes"])))
            return gray, gray.shape
        if prepared is not None:
            hit = prepared.get(image["path"])
            lookups["hit" if hit is not None else "miss"] += 1
            if lookups["miss"] == 100 and lookups["hit"] < 100:
                logger.warning("data.prepared_dir: %d of the last %d images were not in %s or changed since it was "
                               "prepared (e.g. %s); they are decoded from their files. Run python -m "
                               "train.data.prepare again to refresh it", lookups["miss"], sum(lookups.values()),
                               prepared_dir, image["path"])
            if hit is not None:
                return hit
        gray = load_grayscale(image["path"])
        return gray, gray.shape

    def transform(batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "image"}
        pixels, sizes, targets, masks, ok = [], [], [], [], []
        for image, raw_boxes, width, height in zip(batch["image"], batch["boxes"], batch["width"], batch["height"]):
            raw_boxes = np.asarray(raw_boxes, dtype=np.float32)
            try:
                gray, original = load(image)
                if tuple(original) != (height, width):
                    raise ImageLoadError(f"{image['path']}: image is {original[1]}x{original[0]} px but the index says "
                                         f"{width}x{height}; its boxes would be misplaced")
            except ImageLoadError as error:
                if on_error == "raise":
                    raise
                logger.warning("skipping image: %s", error)
                pixels.append(torch.zeros(1, size, size, dtype=torch.uint8))
                sizes.append(torch.tensor([height, width]))
                targets.append(torch.zeros(len(raw_boxes), 4))
                masks.append(torch.zeros(len(raw_boxes), dtype=torch.bool))
                ok.append(False)
                continue
            boxes, mask = image_processor.normalize_boxes(raw_boxes, (height, width))
            pixels.append(image_processor.resize_pad_uint8(gray, original_size=(height, width)))
            sizes.append(torch.tensor([height, width]))
            targets.append(boxes)
            masks.append(mask)
            ok.append(True)
        out.update(pixels=pixels, original_sizes=sizes, target_boxes=targets, box_mask=masks, image_ok=ok)
        return out

    return transform
