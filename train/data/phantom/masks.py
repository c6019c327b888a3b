"""The phantom's exact masks as npz files (``DIR/phantom/masks/{dicom_id}.npz``); read them with :func:`load_masks`.

Keys:

* ``shape``: int32 ``[H, W]``
* ``names``: str ``[K]``, mask names: ``"right lung"``, ``"left lung"``, ``"heart"``, then
  ``"finding_0"``, ``"finding_1"``, ... (one per finding instance, order of ``Phantom.findings``)
* ``boxes``: int32 ``[K, 4]``, the crop ``x1, y1, x2, y2`` (exclusive) each mask is stored in
* ``bits_{k}``: uint8, ``np.packbits`` of the boolean crop of mask k, row-major
* ``finding_labels``, ``finding_regions``, ``finding_sides``, ``finding_severities``: str ``[F]``
  (``""`` where not applicable), parallel to the ``finding_*`` masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from train.data.phantom.findings import Finding


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The pixel box ``(x1, y1, x2, y2)`` (exclusive ``x2``/``y2``) of a bool mask; None when it is empty."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def save_masks(path, masks: dict[str, np.ndarray], findings: list[Finding]) -> None:
    """Write masks as bbox crops packed with np.packbits (keys in the module docstring)."""
    names = list(masks)
    height, width = next(iter(masks.values())).shape
    arrays = {"shape": np.array([height, width], dtype=np.int32), "names": np.array(names, dtype=str)}
    boxes = np.zeros((len(names), 4), dtype=np.int32)
    for k, name in enumerate(names):
        box = mask_box(masks[name]) or (0, 0, 0, 0)
        boxes[k] = box
        x1, y1, x2, y2 = box
        arrays[f"bits_{k}"] = np.packbits(masks[name][y1:y2, x1:x2].ravel())
    arrays["boxes"] = boxes
    arrays["finding_labels"] = np.array([f.label for f in findings], dtype=str)
    arrays["finding_regions"] = np.array([f.region for f in findings], dtype=str)
    arrays["finding_sides"] = np.array([f.side or "" for f in findings], dtype=str)
    arrays["finding_severities"] = np.array([f.severity or "" for f in findings], dtype=str)
    np.savez(path, **arrays)  # crops are packed bits already: compression buys little and costs time


def load_masks(path) -> dict[str, np.ndarray]:
    """Read a mask file written by :func:`save_masks`: name -> bool [H, W]."""
    with np.load(path) as data:
        height, width = (int(v) for v in data["shape"])
        out = {}
        for k, name in enumerate(data["names"].tolist()):
            x1, y1, x2, y2 = (int(v) for v in data["boxes"][k])
            mask = np.zeros((height, width), dtype=bool)
            n = (x2 - x1) * (y2 - y1)
            if n:
                mask[y1:y2, x1:x2] = np.unpackbits(data[f"bits_{k}"], count=n).astype(bool).reshape(y2 - y1, x2 - x1)
            out[str(name)] = mask
        return out
