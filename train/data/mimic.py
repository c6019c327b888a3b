"""The MIMIC-CXR-JPG layout, which the Chest ImaGenome, CheXmask and phantom loaders all read images through.

    {mimic_cxr_jpg_dir}/files/p{first 2 digits of subject}/p{subject_id}/s{study_id}/{dicom_id}.jpg
    {mimic_cxr_jpg_dir}/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv(.gz)
    {mimic_cxr_reports_dir}/files/p{first 2 digits of subject}/p{subject_id}/s{study_id}.txt

e.g. ``files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg``. The metadata table gives
each image's size (``Rows``, ``Columns``), the split table its official split (train / validate / test).
"""

from __future__ import annotations

import csv
from pathlib import Path

from train.data.tables import csv_rows, find_table, open_table, require_columns

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SPLITS = {"train": "train", "validate": "validate", "valid": "validate", "val": "validate", "test": "test"}


def split_name(split: str | None) -> str | None:
    """MIMIC-CXR's name of a split (``valid`` / ``val`` -> ``validate``); None (every split) stays None."""
    if split is None:
        return None
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of train, validate, test (or None for all)")
    return SPLITS[split]


def study_path(subject_id, study_id) -> str:
    """``files/p{first 2 digits of subject}/p{subject_id}/s{study_id}``: a study's image folder, and with
    ``.txt`` its report."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}"


def jpg_path(mimic_dir: Path, subject_id, study_id, dicom_id: str) -> Path:
    return mimic_dir / study_path(subject_id, study_id) / f"{dicom_id}.jpg"


def jpg_path_of_row(mimic_dir: Path, row: dict) -> Path:
    """The JPG of a row with ``dicom_id``, ``subject_id``, ``study_id`` and optionally ``path``, a MIMIC-CXR
    DICOM path (``files/p10/.../{dicom_id}.dcm``, as Chest ImaGenome's split tables give it), used where set."""
    rel = row.get("path") or ""
    if rel:
        rel = rel.split("files/", 1)[-1] if "files/" in rel else rel
        return mimic_dir / "files" / Path(rel).with_suffix(".jpg")
    return jpg_path(mimic_dir, row["subject_id"], row["study_id"], row["dicom_id"])


def report_path(reports_dir: Path, subject_id, study_id) -> Path:
    return reports_dir / f"{study_path(subject_id, study_id)}.txt"


def metadata_table(mimic_dir: Path) -> Path | None:
    return find_table(mimic_dir, METADATA_CSV)


def index_table(mimic_dir: Path) -> Path | None:
    """The table that maps images to subjects and studies: the split table, else the metadata table."""
    return find_table(mimic_dir, SPLIT_CSV) or metadata_table(mimic_dir)


def image_index(mimic_dir: Path) -> dict[str, dict]:
    """dicom_id -> {subject_id, study_id, split} from `index_table` (split ``""`` from the metadata table)."""
    table = index_table(mimic_dir)
    if table is None:
        raise FileNotFoundError(f"{mimic_dir}: neither {SPLIT_CSV} nor {METADATA_CSV} (.gz) found")
    index = {}
    for _, row in csv_rows(table):
        require_columns(table, row, ("dicom_id", "subject_id", "study_id"))
        index[row["dicom_id"]] = {"subject_id": row["subject_id"], "study_id": row["study_id"],
                                  "split": row.get("split", "")}
    return index


def image_sizes(mimic_dir: Path, wanted: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """dicom_id -> (height, width) from the metadata table (Rows, Columns), for the images in `wanted` (every image
    when None); {} without the table. Read row by row: the real table has 377k rows, several hundred MB as dicts."""
    table = metadata_table(mimic_dir)
    if table is None:
        return {}
    sizes = {}
    with open_table(table) as handle:
        for row in csv.DictReader(handle):
            dicom_id = row.get("dicom_id")
            if wanted is not None and dicom_id not in wanted:
                continue
            try:
                sizes[dicom_id] = (int(float(row["Rows"])), int(float(row["Columns"])))
            except (KeyError, TypeError, ValueError):
                continue
    return sizes
