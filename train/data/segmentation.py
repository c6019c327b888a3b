"""Segmentation data (CheXmask lungs + heart, SIIM-ACR pneumothorax, phantom masks) -> `datasets.Dataset`.

Every loader returns the same columns, so one transform serves all of them:

* ``image``: `datasets.Image(decode=False)`, i.e. the file path (JPEG, PNG or DICOM), decoded lazily by
  `make_segmentation_transform` through the model's own image loader.
* ``image_id`` (MIMIC ``dicom_id``, SIIM ``ImageId``), ``split`` (``""`` where the source has none).
* ``height``, ``width``: the original image size, which the masks have.
* ``masks``: one column per class, ``{"right lung": rle, "left lung": rle, "heart": rle}`` (field order =
  class order), each a CheXmask-convention RLE (`train.data.rle`; ``""`` = empty). SIIM-ACR's relative
  column-major RLE is converted once, its several rows per image merged into one mask.
* CheXmask adds ``dice_rca_mean`` (its per-image quality estimate; filter on it with `Dataset.filter`).

Bad rows (undecodable RLE, mask size != image size, missing or unreadable image, unknown image id) raise a
``ValueError`` naming the file and row under ``on_error="raise"``, or are skipped, counted and logged under
``on_error="skip"``. Tables are Arrow-cached like the other loaders (`train.data.common.cached_dataset`):
the checks run when a table is first built.

    dataset = load_chexmask("chexmask/MIMIC-CXR-JPG.csv", "mimic-cxr-jpg/2.0.0", split="train")
    dataset.set_transform(make_segmentation_transform(processor))
    dataset[0]  # {"pixel_values": [3, S, S], "labels": [3, S, S], "valid_mask": [S, S], "original_sizes": [2]}
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.data.common import DataProblems, cached_dataset, file_signature
from train.data.rle import SIIM_EMPTY, chexmask_rle_decode, chexmask_rle_encode, chexmask_rle_runs, siim_rle_decode

CHEXMASK_COLUMNS = {"right lung": "Right Lung", "left lung": "Left Lung", "heart": "Heart"}  # class -> CSV column
SIIM_LABEL = "pneumothorax"
SIIM_IMAGE_SIZE = (1024, 1024)  # SIIM-ACR RLE is defined over 1024 x 1024 images
PHANTOM_ANATOMY_LABELS = ("right lung", "left lung", "heart")
MIMIC_SPLITS = {"train": "train", "validate": "validate", "valid": "validate", "val": "validate", "test": "test"}
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
_CACHE_VERSION = "segmentation-1"


def features(label_names: Sequence[str], extra: dict | None = None):
    """The loaders' columns (module docstring) for the given mask classes."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(decode=False),
        "image_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "height": datasets.Value("int32"),
        "width": datasets.Value("int32"),
        "masks": {name: datasets.Value("string") for name in label_names},
        **(extra or {}),
    })


# ----------------------------------------------------------------------------------------------------- helpers
def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV or CSV.gz; column names stripped (SIIM's is ' EncodedPixels')."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**30))  # full-resolution RLE cells exceed the 128 KiB default
    with gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        for values in reader:
            if not values:  # blank line
                continue
            if len(values) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(values)} fields but {len(header)} columns")
            yield reader.line_num, dict(zip(header, values, strict=True))


def _require_columns(path: Path, row: dict, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; columns are {list(row)}")


def _find_table(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only: DICOM Rows / Columns, else PIL."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return int(dataset.Rows), int(dataset.Columns)
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def _checked_image(path: Path, where: str, size: tuple[int, int], problems: DataProblems) -> bool:
    """Whether `path` exists, reads as an image and is `size` (height, width); else reports the problem."""
    if not path.is_file():
        problems.problem("image missing", where, f"image {path} not found")
        return False
    try:
        got = _image_size(path)
    except Exception as error:  # PIL and pydicom raise many types for corrupt headers
        problems.problem("image unreadable", where, f"{path} is not a readable image ({type(error).__name__}: {error})")
        return False
    if got != tuple(size):
        problems.problem(
            "size mismatch", where, f"image {path} is {got[1]}x{got[0]} px but its masks are {size[1]}x{size[0]}"
        )
        return False
    return True


def _mimic_index(mimic_dir: Path) -> dict[str, dict]:
    """dicom_id -> {subject_id, study_id, split} from the MIMIC-CXR-JPG split table (or metadata table)."""
    table = _find_table(mimic_dir, SPLIT_CSV) or _find_table(mimic_dir, METADATA_CSV)
    if table is None:
        raise FileNotFoundError(f"{mimic_dir}: neither {SPLIT_CSV} nor {METADATA_CSV} (.gz) found")
    index = {}
    for _, row in _csv_rows(table):
        _require_columns(table, row, ("dicom_id", "subject_id", "study_id"))
        index[row["dicom_id"]] = {"subject_id": row["subject_id"], "study_id": row["study_id"],
                                  "split": row.get("split", "")}
    return index


def _mimic_jpg(mimic_dir: Path, dicom_id: str, entry: dict) -> Path:
    subject = entry["subject_id"]
    return mimic_dir / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{entry['study_id']}" / f"{dicom_id}.jpg"


def _split_name(split: str | None) -> str | None:
    if split is None:
        return None
    if split not in MIMIC_SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of train, validate, test (or None for all)")
    return MIMIC_SPLITS[split]


# ----------------------------------------------------------------------------------------------------- CheXmask
def load_chexmask(
    chexmask_csv,
    mimic_cxr_jpg_dir,
    split: str | None = None,
    *,
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

    A row is bad when its ``dicom_id`` is not in the MIMIC-CXR-JPG table, its image is missing or unreadable,
    ``Height`` / ``Width`` differ from the image, or an RLE is blank or does not fit ``Height x Width``.
    """
    import datasets

    chexmask_csv, mimic_dir, split = Path(chexmask_csv), Path(mimic_cxr_jpg_dir), _split_name(split)
    if not chexmask_csv.is_file():
        raise FileNotFoundError(f"load_chexmask: {chexmask_csv}: CheXmask CSV not found")
    if not (mimic_dir / "files").is_dir():
        raise FileNotFoundError(f"load_chexmask: {mimic_dir / 'files'}: MIMIC-CXR-JPG files/ folder not found")
    index_table = _find_table(mimic_dir, SPLIT_CSV) or _find_table(mimic_dir, METADATA_CSV)
    key = {
        "v": _CACHE_VERSION, "csv": str(chexmask_csv.resolve()), "mimic": str(mimic_dir.resolve()), "split": split,
        "on_error": on_error, "sources": [file_signature(chexmask_csv), file_signature(index_table or mimic_dir)],
    }
    name = f"chexmask-{split or 'all'}"

    def build():
        problems = DataProblems(name, on_error)
        images = _mimic_index(mimic_dir)
        rows = []
        for line, row in _csv_rows(chexmask_csv):
            _require_columns(chexmask_csv, row, ("dicom_id", "Height", "Width", *CHEXMASK_COLUMNS.values()))
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
            jpg = _mimic_jpg(mimic_dir, dicom_id, entry)
            if masks is None or not _checked_image(jpg, where, (height, width), problems):
                continue
            rows.append({
                "image": str(jpg), "image_id": dicom_id, "split": entry["split"],
                "height": height, "width": width, "masks": masks,
                "dice_rca_mean": _float_or_nan(row.get("Dice RCA (Mean)")),
            })
        return rows, problems

    extra = {"dice_rca_mean": datasets.Value("float32")}
    return cached_dataset(name, key, build, features(list(CHEXMASK_COLUMNS), extra), cache_dir=cache_dir,
                          overwrite=overwrite_cache)


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


# ----------------------------------------------------------------------------------------------------- SIIM-ACR
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
        "v": _CACHE_VERSION, "csv": str(rle_csv.resolve()), "images": str(images_dir.resolve()), "on_error": on_error,
        "sources": [file_signature(rle_csv), file_signature(images_dir)],
    }

    def build():
        problems = DataProblems("siim-acr", on_error)
        components: dict[str, list[tuple[int, str]]] = {}  # ImageId -> [(line, rle)], in CSV order
        for line, row in _csv_rows(rle_csv):
            _require_columns(rle_csv, row, ("ImageId", "EncodedPixels"))
            components.setdefault(row["ImageId"].strip(), []).append((line, row["EncodedPixels"]))
        dicoms = {path.stem: path for path in sorted(images_dir.rglob("*.dcm"))}
        rows = []
        for image_id, parts in components.items():
            where = f"{rle_csv}, line {parts[0][0]} (ImageId {image_id})"
            path = dicoms.get(image_id, images_dir / f"{image_id}.dcm")
            rle = _siim_union_rle(rle_csv, image_id, parts, problems)
            if rle is None or not _checked_image(path, where, SIIM_IMAGE_SIZE, problems):
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


# ----------------------------------------------------------------------------------------------------- phantom
def load_phantom_segmentation(
    root,
    split: str | None = None,
    labels: Sequence[str] = PHANTOM_ANATOMY_LABELS,
    *,
    on_error: str = "skip",
    cache_dir=None,
    overwrite_cache: bool = False,
):
    """Masks of a phantom set (`python -m train.data.phantom`) from its exact ``phantom/masks/*.npz`` files.

    Args:
        root: the phantom set's folder (holds ``mimic-cxr-jpg/`` and ``phantom/masks/``).
        labels: ``right lung``, ``left lung``, ``heart`` and / or finding labels the generator draws (e.g.
            ``pneumothorax``: the union of that finding's masks, empty where the image has none).
    """
    from train.data.phantom import FINDING_WEIGHTS

    root, split = Path(root), _split_name(split)
    labels = list(labels)
    unknown = [name for name in labels if name not in PHANTOM_ANATOMY_LABELS and name not in FINDING_WEIGHTS]
    if not labels or unknown or len(set(labels)) != len(labels):
        raise ValueError(
            f"load_phantom_segmentation: labels must be unique names from {list(PHANTOM_ANATOMY_LABELS)} or the "
            f"phantom findings {list(FINDING_WEIGHTS)}; got {labels!r}"
        )
    mimic_dir, masks_dir = root / "mimic-cxr-jpg", root / "phantom" / "masks"
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"load_phantom_segmentation: {masks_dir}: no phantom mask folder (not a phantom set?)")
    key = {
        "v": _CACHE_VERSION, "root": str(root.resolve()), "split": split, "labels": labels, "on_error": on_error,
        "sources": [file_signature(root / "phantom" / "manifest.json"), file_signature(masks_dir)],
    }
    name = f"phantom-segmentation-{split or 'all'}"

    def build():
        problems = DataProblems(name, on_error)
        rows = []
        for dicom_id, entry in _mimic_index(mimic_dir).items():
            if split is not None and entry["split"] != split:
                continue
            npz = masks_dir / f"{dicom_id}.npz"
            try:
                masks = _phantom_masks(npz, labels)
            except (OSError, ValueError, KeyError) as error:
                problems.problem("mask file unreadable", str(npz), f"{type(error).__name__}: {error}")
                continue
            height, width = next(iter(masks.values())).shape
            jpg = _mimic_jpg(mimic_dir, dicom_id, entry)
            if not _checked_image(jpg, str(npz), (height, width), problems):
                continue
            rows.append({"image": str(jpg), "image_id": dicom_id, "split": entry["split"], "height": height,
                         "width": width, "masks": {n: chexmask_rle_encode(m) for n, m in masks.items()}})
        return rows, problems

    return cached_dataset(name, key, build, features(labels), cache_dir=cache_dir, overwrite=overwrite_cache)


def _phantom_masks(npz: Path, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """label -> bool [H, W]; a finding label is the union of that finding's instance masks."""
    from train.data.phantom import load_masks

    masks = load_masks(npz)
    with np.load(npz) as data:
        finding_labels = data["finding_labels"].tolist()
    empty = np.zeros_like(masks["right lung"])
    out = {}
    for name in labels:
        if name in PHANTOM_ANATOMY_LABELS:
            out[name] = masks[name]
        else:
            instances = [masks[f"finding_{k}"] for k, label in enumerate(finding_labels) if label == name]
            out[name] = np.logical_or.reduce(instances) if instances else empty
    return out


# ----------------------------------------------------------------------------------------------------- transform
def resize_pad_masks(masks: np.ndarray, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[C, H, W]` bool masks -> (`[C, S, S]` float32 labels, `[S, S]` bool valid_mask) in the image's geometry.

    Same geometry as `AnatomyVLMImageProcessor`: resized (antialiased bilinear, aspect kept) so the long side
    is `size`, then padded bottom / right; a pixel is in a mask when at least half of it is covered.
    `valid_mask` is False on the padding.
    """
    height, width = image_processor.resized_size(*masks.shape[-2:])
    size = image_processor.size
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(masks)).float()[None], size=(height, width),
                            mode="bilinear", antialias=True, align_corners=False)[0]
    labels = torch.zeros(masks.shape[0], size, size)
    labels[:, :height, :width] = (resized >= 0.5).float()
    valid_mask = torch.zeros(size, size, dtype=torch.bool)
    valid_mask[:height, :width] = True
    return labels, valid_mask


def make_segmentation_transform(processor, label_names: Sequence[str] | None = None):
    """A `Dataset.set_transform` function for the loaders' tables.

    Returns per example ``pixel_values`` `[3, S, S]`, ``labels`` `[C, S, S]` float (classes in `label_names`
    order, default the ``masks`` column's order), ``valid_mask`` `[S, S]` bool and ``original_sizes`` `[2]`
    (height, width). An image whose decoded size differs from the table's raises a ``ValueError``.
    """
    from PIL import Image

    image_processor = getattr(processor, "image_processor", processor)

    def transform(batch: dict) -> dict:
        out = {"pixel_values": [], "labels": [], "valid_mask": [], "original_sizes": []}
        for image, masks, height, width in zip(
            batch["image"], batch["masks"], batch["height"], batch["width"], strict=True
        ):
            names = list(masks) if label_names is None else list(label_names)
            missing = [name for name in names if name not in masks]
            if missing:
                raise ValueError(f"{image['path']}: no mask for {missing}; this table has {list(masks)}")
            source = image["path"] if image.get("bytes") is None else Image.open(io.BytesIO(image["bytes"]))
            encoded = image_processor([source])
            if tuple(encoded["original_sizes"][0].tolist()) != (height, width):
                got = encoded["original_sizes"][0].tolist()
                raise ValueError(f"{image['path']}: image is {got[1]}x{got[0]} px but its masks are {width}x{height}")
            stack = np.stack([chexmask_rle_decode(masks[name], height, width) for name in names])
            labels, valid_mask = resize_pad_masks(stack, image_processor)
            out["pixel_values"].append(encoded["pixel_values"][0])
            out["labels"].append(labels)
            out["valid_mask"].append(valid_mask)
            out["original_sizes"].append(encoded["original_sizes"][0])
        return out

    return transform
