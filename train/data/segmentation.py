"""What the segmentation loaders share: their columns, the image checks, the phantom masks, the transform.

Loaders: `train.data.chexmask` (CheXmask lungs + heart over MIMIC-CXR-JPG), `train.data.siim` (SIIM-ACR
pneumothorax) and `load_phantom_segmentation` here (a phantom set's exact masks). Every loader returns the same
columns, so one transform serves all of them:

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

    dataset = load_chexmask("chexmask/MIMIC-CXR-JPG.csv", "mimic-cxr-jpg/2.0.0", split="train")  # train.data.chexmask
    dataset.set_transform(make_segmentation_transform(processor))
    dataset[0]  # {"pixel_values": [3, S, S], "labels": [3, S, S], "valid_mask": [S, S], "original_sizes": [2]}
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.data import mimic
from train.data.common import DataProblems, cached_dataset, file_signature
from train.data.rle import chexmask_rle_decode, chexmask_rle_encode

PHANTOM_ANATOMY_LABELS = ("right lung", "left lung", "heart")
CACHE_VERSION = "segmentation-1"  # of every segmentation loader's Arrow cache key


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


# ----------------------------------------------------------------------------------------------------- images
def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header only: DICOM Rows / Columns, else PIL."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        return int(dataset.Rows), int(dataset.Columns)
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def checked_image(path: Path, where: str, size: tuple[int, int], problems: DataProblems) -> bool:
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
    from train.data.phantom import DRAWN_FINDINGS

    root, split = Path(root), mimic.split_name(split)
    labels = list(labels)
    unknown = [name for name in labels if name not in PHANTOM_ANATOMY_LABELS and name not in DRAWN_FINDINGS]
    if not labels or unknown or len(set(labels)) != len(labels):
        raise ValueError(
            f"load_phantom_segmentation: labels must be unique names from {list(PHANTOM_ANATOMY_LABELS)} or the "
            f"phantom findings {list(DRAWN_FINDINGS)}; got {labels!r}"
        )
    mimic_dir, masks_dir = root / "mimic-cxr-jpg", root / "phantom" / "masks"
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"load_phantom_segmentation: {masks_dir}: no phantom mask folder (not a phantom set?)")
    key = {
        "v": CACHE_VERSION, "root": str(root.resolve()), "split": split, "labels": labels, "on_error": on_error,
        "sources": [file_signature(root / "phantom" / "manifest.json"), file_signature(masks_dir)],
    }
    name = f"phantom-segmentation-{split or 'all'}"

    def build():
        problems = DataProblems(name, on_error)
        rows = []
        for dicom_id, entry in mimic.image_index(mimic_dir).items():
            if split is not None and entry["split"] != split:
                continue
            npz = masks_dir / f"{dicom_id}.npz"
            try:
                masks = _phantom_masks(npz, labels)
            except (OSError, ValueError, KeyError) as error:
                problems.problem("mask file unreadable", str(npz), f"{type(error).__name__}: {error}")
                continue
            height, width = next(iter(masks.values())).shape
            jpg = mimic.jpg_path(mimic_dir, entry["subject_id"], entry["study_id"], dicom_id)
            if not checked_image(jpg, str(npz), (height, width), problems):
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
