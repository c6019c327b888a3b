"""Run-length encodings of binary masks, in the two conventions the segmentation data sets use.

* CheXmask: ``"start length start length ..."`` with absolute, 1-based starts over the row-major
  (C-order) flattened H x W mask. ``""`` is an empty mask.
* SIIM-ACR (Kaggle's relative form): ``"gap length gap length ..."`` over the column-major (Fortran-order,
  i.e. transposed) flattened mask, each gap counted from the end of the previous run (from pixel 0 for the
  first). ``"-1"`` is an empty mask.

Both decoders go through the same validated 0-based ``(starts, lengths)`` runs, so a malformed string fails
with a ``ValueError`` that says what is wrong instead of drawing a wrong mask. ``*_rle_runs`` validates a
string without drawing the mask, which is what a loader needs to check a large CSV quickly.
"""

import math

import numpy as np

SIIM_EMPTY = "-1"


def _parse_pairs(rle, convention: str) -> np.ndarray:
    """`[K, 2]` int64 pairs of an RLE string; blank, None and NaN (an empty CSV cell) give no pairs."""
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return np.zeros((0, 2), dtype=np.int64)
    if not isinstance(rle, str):
        raise ValueError(f"{convention} RLE must be a string, got {type(rle).__name__}")
    text = rle.strip()
    if not text or text.lower() == "nan":
        return np.zeros((0, 2), dtype=np.int64)
    try:
        values = np.array(text.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise ValueError(f"{convention} RLE is not a list of integers: {_preview(text)}") from None
    if len(values) % 2:
        raise ValueError(f"{convention} RLE has an odd number of values ({len(values)}): {_preview(text)}")
    pairs = values.reshape(-1, 2)
    if (pairs[:, 1] < 0).any():
        raise ValueError(f"{convention} RLE has a negative run length: {_preview(text)}")
    return pairs


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _run_pixels(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of every pixel in the runs (0-based starts): O(pixels set), not O(image)."""
    total = int(lengths.sum())
    run_offsets = np.cumsum(lengths) - lengths  # where each run begins in the concatenated index list
    return np.repeat(starts - run_offsets, lengths) + np.arange(total)


def _flat_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based (starts, exclusive ends) of the runs of True in a flat bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).view(np.int8)))
    return edges[0::2], edges[1::2]


def _as_2d_mask(mask) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask [height, width], got shape {mask.shape}")
    return mask


# -------------------------------------------------------------------------------------------------- CheXmask
def chexmask_rle_runs(rle, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-based (starts, lengths) of a CheXmask RLE over the row-major `height x width` mask."""
    pairs = _parse_pairs(rle, "CheXmask")
    starts, lengths = pairs[:, 0] - 1, pairs[:, 1]
    num_pixels = int(height) * int(width)
    outside = (starts < 0) | (starts + lengths > num_pixels)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"CheXmask RLE run '{starts[k] + 1} {lengths[k]}' lies outside a {height}x{width} mask "
            f"(1-based starts, {num_pixels} pixels)"
        )
    return starts, lengths


def chexmask_rle_decode(rle, height: int, width: int) -> np.ndarray:
    """CheXmask RLE -> bool `[height, width]` mask (blank / NaN: empty mask)."""
    mask = np.zeros((int(height), int(width)), dtype=bool)
    mask.ravel()[_run_pixels(*chexmask_rle_runs(rle, height, width))] = True
    return mask


def chexmask_rle_encode(mask) -> str:
    """Bool `[H, W]` mask -> CheXmask RLE (runs continue across row ends, as in the flattened image)."""
    starts, ends = _flat_runs(_as_2d_mask(mask).ravel())
    pairs = np.stack([starts + 1, ends - starts], axis=1)
    return " ".join(map(str, pairs.ravel().tolist()))


# -------------------------------------------------------------------------------------------------- SIIM-ACR
def siim_rle_runs(rle, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-based (starts, lengths) of a SIIM-ACR relative RLE over the column-major flattened mask."""
    if isinstance(rle, str) and rle.strip() == SIIM_EMPTY:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = _parse_pairs(rle, "SIIM-ACR")
    gaps, lengths = pairs[:, 0], pairs[:, 1]
    if (gaps < 0).any():
        raise ValueError(f"SIIM-ACR RLE has a negative gap (use '{SIIM_EMPTY}' alone for an empty mask)")
    ends = np.cumsum(gaps + lengths)  # exclusive end of each run
    num_pixels = int(height) * int(width)
    if len(ends) and ends[-1] > num_pixels:
        raise ValueError(
            f"SIIM-ACR RLE runs end at pixel {ends[-1]}, past the {height}x{width} mask ({num_pixels} pixels)"
        )
    return ends - lengths, lengths


def siim_rle_decode(rle, height: int = 1024, width: int = 1024) -> np.ndarray:
    """SIIM-ACR relative RLE -> bool `[height, width]` mask (`"-1"`: empty mask)."""
    column_major = _run_pixels(*siim_rle_runs(rle, height, width))  # flat index = x * height + y
    mask = np.zeros((int(height), int(width)), dtype=bool)
    mask[column_major % height, column_major // height] = True
    return mask


def siim_rle_encode(mask) -> str:
    """Bool `[H, W]` mask -> SIIM-ACR relative RLE (`"-1"` when empty)."""
    starts, ends = _flat_runs(_as_2d_mask(mask).ravel(order="F"))
    if not len(starts):
        return SIIM_EMPTY
    gaps = starts - np.concatenate([[0], ends[:-1]])
    pairs = np.stack([gaps, ends - starts], axis=1)
    return " ".join(map(str, pairs.ravel().tolist()))
