"""CheXmask lungs + heart masks of MIMIC-CXR-JPG images -> `datasets.Dataset` (columns: `train.data.segmentation`).

    dataset = load_chexmask("chexmask/MIMIC-CXR-JPG.csv", "mimic-cxr-jpg/2.0.0", split="train")

CheXmask ships one CSV per source dataset with the masks as RLE over the image (`train.data.rle`, row-major,
1-based starts). The table adds ``dice_rca_mean``, CheXmask's per-image quality estimate (Dice RCA (Mean)); its
authors advise keeping ``>= 0.7``, which `min_quality` does by default (``data.chexmask_min_quality``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data import mimic
from train.data.common import DataProblems, cached_dataset, file_signature, logger
from train.data.rle import chexmask_rle_runs
from train.data.segmentation import CACHE_VERSION, checked_image, features
from train.data.tables import csv_rows, require_columns

CHEXMASK_COLUMNS = {"right lung": "Right Lung", "left lung": "Left Lung", "heart": "Heart"}  # class -> CSV column


def load_chexmask(
    chexmask_csv,
    mimic_cxr_jpg_dir,
    split: str | None = None,
    *,
    min_quality: float | None = 0.7,
    on_error: str = "skip",
    cache_dir=None,
    overwrite_cache: bool = False,
):
    """CheXmask lungs + heart masks of MIMIC-CXR-JPG images (classes ``right lung``, ``left lung``, ``heart``).

    Args:
        chexmask_csv: CheXmask's ``MIMIC-CXR-JPG.csv`` (or ``.csv.gz``): ``dicom_id``, ``Dice RCA (Mean)``,
            ``Left Lung``, ``Right Lung``, ``Heart`` (RLE), ``Height``, ``Width``.
        mimic_cxr_jpg_dir: holds ``files/`` and ``mimic-cxr-2.0.0-split.csv`` (or the metadata table), which
            map each ``dicom_id`` to its subject, study and split.
        split: ``train``, ``validate`` or ``test``; ``None`` keeps every row.
        min_quality: keep images whose ``Dice RCA (Mean)`` is at least this (an image without one is dropped too;
            the counts are logged); ``None`` keeps every image.

    A row is bad when its ``dicom_id`` is not in the MIMIC-CXR-JPG table, its image is missing or unreadable,
    ``Height`` / ``Width`` differ from the image, or an RLE is blank or does not fit ``Height x Width``.
    """
    import datasets

    chexmask_csv, mimic_dir, split = Path(chexmask_csv), Path(mimic_cxr_jpg_dir), mimic.split_name(split)
    if not chexmask_csv.is_file():
        raise FileNotFoundError(f"load_chexmask: {chexmask_csv}: CheXmask CSV not found")
    if not (mimic_dir / "files").is_dir():
        raise FileNotFoundError(f"load_chexmask: {mimic_dir / 'files'}: MIMIC-CXR-JPG files/ folder not found")
    index_table = mimic.index_table(mimic_dir)
    key = {
        "v": CACHE_VERSION, "csv": str(chexmask_csv.resolve()), "mimic": str(mimic_dir.resolve()), "split": split,
        "on_error": on_error, "sources": [file_signature(chexmask_csv), file_signature(index_table or mimic_dir)],
    }
    name = f"chexmask-{split or 'all'}"

    def build():
        problems = DataProblems(name, on_error)
        images = mimic.image_index(mimic_dir)
        rows = []
        for line, row in csv_rows(chexmask_csv):
            require_columns(chexmask_csv, row, ("dicom_id", "Height", "Width", *CHEXMASK_COLUMNS.values()))
            dicom_id = row["dicom_id"]
            where = f"{chexmask_csv}, line {line} (dicom_id {dicom_id})"
            entry = images.get(dicom_id)
            if entry is None:
                problems.problem("unknown image", where, "dicom_id not in the MIMIC-CXR-JPG split / metadata table")
                continue
            if split is not None and entry["split"] != split:
                continue
            try:
                height, width = int(float(row["Height"])), int(float(row["Width"]))
            except ValueError:
                problems.problem("bad size", where, f"Height / Width {row['Height']!r} / {row['Width']!r} not numbers")
                continue
            masks = _checked_chexmask_rles(row, height, width, where, problems)
            jpg = mimic.jpg_path(mimic_dir, entry["subject_id"], entry["study_id"], dicom_id)
            if masks is None or not checked_image(jpg, where, (height, width), problems):
                continue
            rows.append({
                "image": str(jpg), "image_id": dicom_id, "split": entry["split"],
                "height": height, "width": width, "masks": masks,
                "dice_rca_mean": _float_or_nan(row.get("Dice RCA (Mean)")),
            })
        return rows, problems

    extra = {"dice_rca_mean": datasets.Value("float32")}
    table = cached_dataset(name, key, build, features(list(CHEXMASK_COLUMNS), extra), cache_dir=cache_dir,
                           overwrite=overwrite_cache)
    if min_quality is None:
        return table
    quality = np.asarray(table["dice_rca_mean"], dtype=np.float32)
    keep = np.flatnonzero(quality >= min_quality)  # NaN (no estimate) compares False: dropped
    logger.info("%s: kept %d of %d images with Dice RCA (Mean) >= %g (%d below, %d without an estimate)", name,
                len(keep), len(table), min_quality, int((quality < min_quality).sum()), int(np.isnan(quality).sum()))
    if len(keep) == 0:
        raise ValueError(f"load_chexmask: no image of {chexmask_csv} ({name}) has Dice RCA (Mean) >= {min_quality}; "
                         "lower data.chexmask_min_quality or set it to null")
    return table.select(keep)


def _checked_chexmask_rles(row: dict, height: int, width: int, where: str, problems: DataProblems) -> dict | None:
    masks = {}
    for label, column in CHEXMASK_COLUMNS.items():
        rle = row[column].strip()
        if not rle:
            problems.problem("mask missing", where, f"no RLE in column {column!r}")
            return None
        try:
            chexmask_rle_runs(rle, height, width)  # validates without drawing the mask
        except ValueError as error:
            problems.problem("bad RLE", where, f"column {column!r}: {error}")
            return None
        masks[label] = rle
    return masks


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
