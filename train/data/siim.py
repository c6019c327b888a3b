"""SIIM-ACR pneumothorax masks of its DICOM images -> `datasets.Dataset` (columns: `train.data.segmentation`).

    dataset = load_siim_acr("siim/train-rle.csv", "siim/dicom-images-train")

The RLE is Kaggle's relative, column-major form over 1024 x 1024 images (`train.data.rle`); it is converted once
to CheXmask's convention, an image's several rows (its components) merged into one mask.
"""

from __future__ import annotations

from pathlib import Path

from train.data.common import DataProblems, cached_dataset, file_signature
from train.data.rle import SIIM_EMPTY, chexmask_rle_encode, siim_rle_decode
from train.data.segmentation import CACHE_VERSION, checked_image, features
from train.data.tables import csv_rows, require_columns

SIIM_LABEL = "pneumothorax"
SIIM_IMAGE_SIZE = (1024, 1024)  # SIIM-ACR RLE is defined over 1024 x 1024 images


def load_siim_acr(rle_csv, images_dir, *, on_error: str = "skip", cache_dir=None, overwrite_cache: bool = False):
    """SIIM-ACR pneumothorax masks (class ``pneumothorax``) of the DICOM images under `images_dir`.

    Args:
        rle_csv: ``train-rle.csv`` (or ``.csv.gz``): ``ImageId``, `` EncodedPixels`` (Kaggle relative,
            column-major RLE; ``-1`` = no pneumothorax; several rows of one image are its components, merged).
        images_dir: searched recursively for ``{ImageId}.dcm`` (the Kaggle ``dicom-images-train`` tree).

    An image is bad when its DICOM is missing or unreadable, is not 1024 x 1024, or one of its rows does not
    decode; the error names the CSV line.
    """
    rle_csv, images_dir = Path(rle_csv), Path(images_dir)
    if not rle_csv.is_file():
        raise FileNotFoundError(f"load_siim_acr: {rle_csv}: RLE CSV not found")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"load_siim_acr: {images_dir}: image folder not found")
    key = {
        "v": CACHE_VERSION, "csv": str(rle_csv.resolve()), "images": str(images_dir.resolve()), "on_error": on_error,
        "sources": [file_signature(rle_csv), file_signature(images_dir)],
    }

    def build():
        problems = DataProblems("siim-acr", on_error)
        components: dict[str, list[tuple[int, str]]] = {}  # ImageId -> [(line, rle)], in CSV order
        for line, row in csv_rows(rle_csv):
            require_columns(rle_csv, row, ("ImageId", "EncodedPixels"))
            components.setdefault(row["ImageId"].strip(), []).append((line, row["EncodedPixels"]))
        dicoms = {path.stem: path for path in sorted(images_dir.rglob("*.dcm"))}
        rows = []
        for image_id, parts in components.items():
            where = f"{rle_csv}, line {parts[0][0]} (ImageId {image_id})"
            path = dicoms.get(image_id, images_dir / f"{image_id}.dcm")
            rle = _siim_union_rle(rle_csv, image_id, parts, problems)
            if rle is None or not checked_image(path, where, SIIM_IMAGE_SIZE, problems):
                continue
            rows.append({"image": str(path), "image_id": image_id, "split": "", "height": SIIM_IMAGE_SIZE[0],
                         "width": SIIM_IMAGE_SIZE[1], "masks": {SIIM_LABEL: rle}})
        return rows, problems

    return cached_dataset("siim-acr", key, build, features([SIIM_LABEL]), cache_dir=cache_dir,
                          overwrite=overwrite_cache)


def _siim_union_rle(rle_csv: Path, image_id: str, parts: list[tuple[int, str]], problems: DataProblems):
    """The union of an image's component masks as CheXmask RLE, or None (problem reported) when one does not
    decode. Images whose rows are all "-1" (most of them) are not drawn."""
    mask = None
    for line, rle in parts:
        if rle.strip() == SIIM_EMPTY:
            continue
        try:
            component = siim_rle_decode(rle, *SIIM_IMAGE_SIZE)
        except ValueError as error:
            problems.problem("bad RLE", f"{rle_csv}, line {line} (ImageId {image_id})", str(error))
            return None
        mask = component if mask is None else mask | component
    return "" if mask is None else chexmask_rle_encode(mask)
