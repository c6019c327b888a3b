"""Procedural "phantom" chest X-rays written in the native MIMIC-CXR-JPG / Chest ImaGenome / CheXmask layouts.

Every image is a frontal (PA) radiograph drawn from simple implicit shapes on a coordinate grid: body and
soft tissue, both lungs, heart, mediastinum, aortic knob, trachea with carina and main bronchi, spine with
vertebrae, clavicles, posterior and anterior ribs, diaphragm domes and the abdomen. Findings are drawn into
specific Chest ImaGenome regions (with side and severity) and each gets its own mask. The 29 region boxes
(``ANATOMICAL_REGIONS`` order) follow from the drawn anatomy, the report is written from the findings, and
the scene graph follows the Chest ImaGenome JSON schema, so the project's real-data loaders read it as is.

Conventions
-----------
* "right" is the patient's right = the LEFT side of the image.
* Boxes are pixel boxes ``(x1, y1, x2, y2)`` with exclusive ``x2``/``y2`` (``width = x2 - x1``), inside
  ``[0, W] x [0, H]`` and non-degenerate.
* Image ``i`` of a set uses its own RNG seeded from ``(seed, i)``; its patient (two studies per subject)
  uses one seeded from ``(seed, subject key)``: output does not depend on the worker count.

Canonical anatomy frame: x = 0 is the midline, x > 0 is IMAGE right (patient left), y grows downwards,
the thorax half-width is 1, the lung apices sit near y = 0 and the costophrenic angles near y = Lh.
A similarity transform (scale, shift, rotation) maps it to pixels.

Usage::

    python -m train.data.phantom --out DIR --n 1000 --seed 0 [--size 512] [--workers K]

npz mask files (``DIR/phantom/masks/{dicom_id}.npz``), read them with :func:`load_masks`:

* ``shape``: int32 ``[H, W]``
* ``names``: str ``[K]``, mask names: ``"right lung"``, ``"left lung"``, ``"heart"``, then
  ``"finding_0"``, ``"finding_1"``, ... (one per finding instance, order of ``Phantom.findings``)
* ``boxes``: int32 ``[K, 4]``, the crop ``x1, y1, x2, y2`` (exclusive) each mask is stored in
* ``bits_{k}``: uint8, ``np.packbits`` of the boolean crop of mask k, row-major
* ``finding_labels``, ``finding_regions``, ``finding_sides``, ``finding_severities``: str ``[F]``
  (``""`` where not applicable), parallel to the ``finding_*`` masks.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS
from train.data.rle import chexmask_rle_decode as rle_decode, chexmask_rle_encode as rle_encode  # noqa: F401
from train.text.vocabulary import FINDING_CATEGORY

GENERATOR_VERSION = "phantom-1.0"
RENDER_FACTOR = 3  # smooth anatomy is rendered at 1/RENDER_FACTOR resolution, then upsampled
CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
CHEXMASK_COLUMNS = (
    "dicom_id", "Dice RCA (Max)", "Dice RCA (Mean)", "Landmarks", "Left Lung", "Right Lung", "Heart",
    "Height", "Width",
)

# The finding types this generator draws (all spelled as in DEFAULT_FINDINGS) and their sampling weights.
FINDING_WEIGHTS = {
    "lung opacity": 1.2,
    "consolidation": 1.0,
    "pleural effusion": 1.3,
    "pneumothorax": 0.9,
    "atelectasis": 1.1,
    "enlarged cardiac silhouette": 1.1,
    "mass/nodule (not otherwise specified)": 0.8,
    "elevated hemidiaphragm": 0.7,
    "pulmonary edema/hazy opacity": 0.8,
    "scoliosis": 0.6,
    "endotracheal tube": 0.6,
    "enteric tube": 0.6,
}
assert all(label in DEFAULT_FINDINGS for label in FINDING_WEIGHTS)
assert "costophrenic angle blunting" in DEFAULT_FINDINGS

SIZE_WORD = {"mild": "small", "moderate": "moderate", "severe": "large"}
ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


# ----------------------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One drawn finding instance. ``region`` is the box its mask lies in; ``regions`` every region the
    report attributes it to (the specific region first, then its lung)."""

    label: str
    side: str | None  # "right" / "left" (patient) or None; bilateral findings are one instance per side
    severity: str | None  # "mild" / "moderate" / "severe" or None
    region: str
    regions: list[str]
    mask_key: str
    bilateral: bool = False
    uncertain: bool = False


@dataclass
class Phantom:
    index: int
    seed: int
    image: np.ndarray  # uint8 [H, W]
    boxes: dict[str, tuple[int, int, int, int]]  # ANATOMICAL_REGIONS name -> (x1, y1, x2, y2), exclusive x2/y2
    masks: dict[str, np.ndarray]  # "right lung", "left lung", "heart", "finding_{j}" -> bool [H, W]
    findings: list[Finding]
    report: str
    scene_graph: dict
    subject_id: int
    study_id: int
    dicom_id: str
    split: str  # "train" / "validate" / "test" (MIMIC-CXR naming)
    chexpert: dict[str, float | None] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def boxes_array(self) -> np.ndarray:
        """float32 [29, 4] boxes in ANATOMICAL_REGIONS order."""
        return np.array([self.boxes[name] for name in ANATOMICAL_REGIONS], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# CheXmask RLE and mask files
# ----------------------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def save_masks(path, masks: dict[str, np.ndarray], findings: list[Finding]) -> None:
    """Write masks as bbox crops packed with np.packbits (keys documented in the module docstring)."""
    names = list(masks)
    height, width = next(iter(masks.values())).shape
    arrays = {"shape": np.array([height, width], dtype=np.int32), "names": np.array(names, dtype=str)}
    boxes = np.zeros((len(names), 4), dtype=np.int32)
    for k, name in enumerate(names):
        box = _bbox(masks[name]) or (0, 0, 0, 0)
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


# ----------------------------------------------------------------------------------------------------------
# Identifiers and splits
# ----------------------------------------------------------------------------------------------------------


def _hash_int(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def subject_key(index: int) -> int:
    """Two consecutive studies share a patient."""
    return index // 2


def make_ids(seed: int, index: int) -> tuple[int, int, str]:
    """(subject_id, study_id, dicom_id), unique within a set of up to 10 million images."""
    key = subject_key(index)
    # affine permutations of [0, 10^7): multipliers coprime with 10^7 make the ids unique.
    a_subj = 1 + 2 * (_hash_int("a_subj", seed) % 4_999_999)
    a_subj += 2 if a_subj % 5 == 0 else 0
    a_stud = 1 + 2 * (_hash_int("a_stud", seed) % 4_999_999)
    a_stud += 2 if a_stud % 5 == 0 else 0
    subject_id = 10_000_000 + (a_subj * key + _hash_int("b_subj", seed)) % 10_000_000
    study_id = 50_000_000 + (a_stud * index + _hash_int("b_stud", seed)) % 10_000_000
    digest = hashlib.sha1(f"phantom-dicom:{seed}:{index}".encode()).hexdigest()
    dicom_id = "-".join(digest[i:i + 8] for i in range(0, 40, 8))
    return subject_id, study_id, dicom_id


def split_of(seed: int, index: int) -> str:
    """~80/10/10 by subject (MIMIC-CXR names: train / validate / test)."""
    u = _hash_int("split", seed, subject_key(index)) % 1000
    return "train" if u < 800 else ("validate" if u < 900 else "test")


def _avoid(seed: int, index: int) -> bool:
    return _hash_int("avoid", seed, index) % 100 == 0


# ----------------------------------------------------------------------------------------------------------
# Shared texture banks (deterministic, built once per process and size)
# ----------------------------------------------------------------------------------------------------------

_BANKS: dict = {}


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    noise -= noise.mean()
    noise /= noise.std() + 1e-6
    return noise


def _banks(size: int):
    if size not in _BANKS:
        rng = np.random.default_rng(12345)
        n_low = (size // RENDER_FACTOR + 2) * 2
        vessels = 0.6 * _smooth_noise(rng, (n_low, n_low), 1.2) + 0.4 * _smooth_noise(rng, (n_low, n_low), 3.0)
        blobs = _smooth_noise(rng, (n_low, n_low), 4.0)
        g = rng.standard_normal((size + 64, size + 64)).astype(np.float32)
        grain = [np.round(g * sigma).astype(np.int16) for sigma in (1.5, 2.5, 3.5, 5.0)]
        _BANKS[size] = (vessels.astype(np.float32), blobs.astype(np.float32), grain)
    return _BANKS[size]


def _crop(bank: np.ndarray, rng: np.random.Generator, shape) -> np.ndarray:
    y = int(rng.integers(0, bank.shape[0] - shape[0] + 1))
    x = int(rng.integers(0, bank.shape[1] - shape[1] + 1))
    return bank[y:y + shape[0], x:x + shape[1]]


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------


def _smooth01(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Frame:
    """Similarity transform canonical -> pixel (full resolution) plus the render grid."""

    def __init__(self, height, width, scale, cx, cy, theta, y_center, factor):
        self.height, self.width, self.s, self.cx, self.cy = height, width, scale, cx, cy
        self.cos, self.sin, self.y_center, self.factor = math.cos(theta), math.sin(theta), y_center, factor
        self.hr, self.wr = -(-height // factor), -(-width // factor)
        u = (np.arange(self.wr, dtype=np.float32) + 0.5) * factor - 0.5 - cx
        v = (np.arange(self.hr, dtype=np.float32) + 0.5) * factor - 0.5 - cy
        inv = 1.0 / scale
        self.X = (self.cos * u[None, :] + self.sin * v[:, None]) * inv
        self.Y = (-self.sin * u[None, :] + self.cos * v[:, None]) * inv + y_center
        self.eps = factor / scale  # canonical units per render pixel

    def to_pixel(self, x, y):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64) - self.y_center
        return self.cx + self.s * (self.cos * x - self.sin * y), self.cy + self.s * (self.sin * x + self.cos * y)

    def to_canonical(self, px, py):
        u, v = px - self.cx, py - self.cy
        return (self.cos * u + self.sin * v) / self.s, (-self.sin * u + self.cos * v) / self.s + self.y_center

    def box_of_points(self, xs, ys, pad_px=0.0):
        px, py = self.to_pixel(xs, ys)
        return _clip_box((px.min() - pad_px, py.min() - pad_px, px.max() + pad_px, py.max() + pad_px),
                         self.width, self.height)

    def soft(self, g, sharp=1.0):
        """Anti-aliased inside indicator of the implicit function g (< 0 inside, canonical units)."""
        return np.clip(0.5 - g * (sharp / self.eps), 0.0, 1.0)

    def render_box_mask(self, box):
        """float32 [hr, wr] indicator of render pixels whose full-res centre lies in the box."""
        f = self.factor
        x1, y1, x2, y2 = box
        cols = (np.arange(self.wr) + 0.5) * f - 0.5
        rows = (np.arange(self.hr) + 0.5) * f - 0.5
        cm = ((cols >= x1 - 0.5) & (cols <= x2 - 0.5)).astype(np.float32)
        rm = ((rows >= y1 - 0.5) & (rows <= y2 - 0.5)).astype(np.float32)
        return rm[:, None] * cm[None, :]


def _clip_box(box, width, height, min_size=2):
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = int(math.floor(max(0.0, min(x1, width - min_size)))), int(math.ceil(min(float(width), x2)))
    y1, y2 = int(math.floor(max(0.0, min(y1, height - min_size)))), int(math.ceil(min(float(height), y2)))
    x2 = max(x2, x1 + min_size)
    y2 = max(y2, y1 + min_size)
    return x1, y1, x2, y2


def _seg_dist(X, Y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-9
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) * (1.0 / L2), 0.0, 1.0)
    return np.sqrt((X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2)


def _upsample_mask(soft: np.ndarray, frame: _Frame) -> np.ndarray:
    """Bilinear upsample of a [0,1] render-res field to full res (only its support), thresholded at 0.5."""
    f, H, W = frame.factor, frame.height, frame.width
    out = np.zeros((H, W), dtype=bool)
    rows = np.flatnonzero(soft.max(1) > 0.1)
    if rows.size == 0:
        return out
    cols = np.flatnonzero(soft[rows[0]:rows[-1] + 1].max(0) > 0.1)
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, frame.hr)
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, frame.wr)
    crop = (soft[r0:r1, c0:c1] * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(crop, "L").resize(((c1 - c0) * f, (r1 - r0) * f), Image.BILINEAR)
    up = np.asarray(im) >= 128
    y0, x0 = r0 * f, c0 * f
    hh, ww = min(up.shape[0], H - y0), min(up.shape[1], W - x0)
    out[y0:y0 + hh, x0:x0 + ww] = up[:hh, :ww]
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling of patients and findings
# ----------------------------------------------------------------------------------------------------------


def _sample_findings(rng: np.random.Generator) -> list[dict]:
    if rng.random() < 0.35:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.33, 0.17]))
    labels = list(FINDING_WEIGHTS)
    weights = np.array([FINDING_WEIGHTS[l] for l in labels])
    chosen = rng.choice(len(labels), size=k, replace=False, p=weights / weights.sum())
    specs = []
    used = set()  # (label-group, side) to avoid contradictory combinations
    for c in sorted(chosen.tolist()):
        label = labels[c]
        side = "right" if rng.random() < 0.5 else "left"
        sev = str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.35, 0.2]))
        spec = {"label": label, "side": side, "severity": sev}
        if label in ("lung opacity", "consolidation", "mass/nodule (not otherwise specified)", "atelectasis"):
            zones = ["upper", "mid", "lower"] if label != "atelectasis" else ["mid", "lower", "lower"]
            spec["zone"] = str(rng.choice(zones))
        if label == "mass/nodule (not otherwise specified)":
            spec["severity"] = None
            spec["size"] = str(rng.choice(["small", "large"], p=[0.7, 0.3]))
        if label in ("elevated hemidiaphragm", "endotracheal tube", "enteric tube"):
            spec["severity"] = None
        if label == "scoliosis":
            spec["severity"] = str(rng.choice(["mild", "moderate"], p=[0.65, 0.35]))
        if label in ("enlarged cardiac silhouette", "pulmonary edema/hazy opacity", "endotracheal tube",
                     "enteric tube"):
            spec["side"] = None
        if label == "pleural effusion" and rng.random() < 0.25:
            spec["bilateral"] = True
        if label == "pulmonary edema/hazy opacity":
            spec["bilateral"] = True
        if label in ("pneumothorax", "pleural effusion"):
            sides = {"right", "left"} if spec.get("bilateral") else {side}
            if any(("pleural", s) in used for s in sides):
                continue
            used.update(("pleural", s) for s in sides)
        specs.append(spec)
    return specs


def _patient(seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, subject_key(index), 7])
    return {
        "gender": "F" if rng.random() < 0.5 else "M",
        "age_decile": str(rng.choice(["20-30", "30-40", "40-50", "50-60", "60-70", "70-80", "80-90"])),
        "lung_lat": float(rng.uniform(0.86, 0.95)),
        "lung_h": float(rng.uniform(1.45, 1.85)),
        "heart_w": float(rng.uniform(0.40, 0.47)),
        "med_w": float(rng.uniform(0.11, 0.14)),
        "body_w": float(rng.uniform(1.18, 1.38)),
    }


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


class _Scene:
    """Anatomy parameters and the render-resolution fields of one image."""


def _anatomy_params(rng, patient, specs):
    p = _Scene()
    p.lat = patient["lung_lat"] * rng.uniform(0.97, 1.03)
    p.Lh = patient["lung_h"] * rng.uniform(0.95, 1.05)
    p.mw = patient["med_w"]
    p.apex = {"right": rng.uniform(-0.02, 0.04), "left": rng.uniform(0.0, 0.06)}
    p.base = {"right": p.Lh, "left": p.Lh + rng.uniform(0.02, 0.1)}
    p.dome_h = {"right": rng.uniform(0.24, 0.34), "left": rng.uniform(0.2, 0.3)}
    ctr = patient["heart_w"] * rng.uniform(0.95, 1.05)
    for s in specs:
        if s["label"] == "enlarged cardiac silhouette":
            ctr *= {"mild": 1.22, "moderate": 1.36, "severe": 1.5}[s["severity"]]
        if s["label"] == "elevated hemidiaphragm":
            p.base[s["side"]] -= rng.uniform(0.22, 0.34)
    p.heart_phi = rng.uniform(0.3, 0.5)
    p.heart_a = ctr * 1.02
    p.heart_b = ctr * rng.uniform(0.66, 0.74)
    p.heart_x = rng.uniform(0.1, 0.16) + 0.25 * (ctr - 0.43)
    p.heart_bottom = p.base["left"] - p.dome_h["left"] * 0.55
    p.heart_y = p.heart_bottom - p.heart_b * 0.78
    p.knob_r = rng.uniform(0.07, 0.1)
    p.knob_x = p.mw + p.knob_r * rng.uniform(0.3, 0.6)
    p.knob_y = rng.uniform(0.26, 0.32) * p.Lh
    p.trach_w = rng.uniform(0.04, 0.05)
    p.carina_y = p.knob_y + rng.uniform(0.12, 0.2)
    p.trach_x = rng.uniform(-0.02, 0.02)
    p.spine_w = rng.uniform(0.075, 0.095)
    p.vert_h = rng.uniform(0.13, 0.16)
    p.scol_amp = 0.0
    for s in specs:
        if s["label"] == "scoliosis":
            p.scol_amp = {"mild": 0.09, "moderate": 0.17}[s["severity"]] * (1 if s.get("convex", 1) > 0 else -1)
    p.clav_y = rng.uniform(0.12, 0.2)
    p.clav_rise = rng.uniform(0.18, 0.3)
    p.rib_sp = rng.uniform(0.16, 0.2) * p.Lh / 1.65
    p.rib_phase = rng.uniform(0, 1)
    p.body_w = patient["body_w"]
    p.bubble = rng.random() < 0.6
    return p


def _dome(p, side, xm):
    """Diaphragm dome height (canonical y) for mirrored coordinate xm (lateral positive) of a side."""
    med = p.mw
    centre = 0.5 * (p.lat + med) - 0.05
    inv_med = np.float32(1.0 / (centre - med + 0.1))
    inv_lat = np.float32(1.0 / (p.lat - centre))
    d = xm - centre
    u = d * (inv_med + (xm > centre) * (inv_lat - inv_med))
    return p.base[side] - p.dome_h[side] * np.maximum(1.0 - u * u, 0.0)


def _spine_x(p, Y):
    """Spine centreline (scoliosis: one C-curve over the thorax)."""
    t = np.clip((Y + 0.2) * (1.0 / (p.Lh + 0.4)), 0.0, 1.0)
    return p.scol_amp * 4.0 * t * (1.0 - t)


def _trachea_x(p, Y):
    return p.trach_x - 0.02 * np.exp(-(((Y - p.knob_y) * 5.0) ** 2)) + 0.3 * _spine_x(p, Y)


def _render_anatomy(fr: _Frame, p, rng):
    X, Y = fr.X, fr.Y
    f = {}
    spine_cx = _spine_x(p, Y)
    f["spine_cx"] = spine_cx
    # heart: rotated ellipse, bottom cut by the diaphragm
    c, s = math.cos(p.heart_phi), math.sin(p.heart_phi)
    hx, hy = X - p.heart_x, Y - p.heart_y
    q = np.sqrt(((c * hx + s * hy) * (1.0 / p.heart_a)) ** 2 + ((c * hy - s * hx) * (1.0 / p.heart_b)) ** 2)
    heart = fr.soft(np.maximum((q - 1.0) * p.heart_b, Y - p.heart_bottom))
    f["heart"] = heart
    # mediastinum band (follows the spine a little), aortic knob
    med = fr.soft(np.maximum(np.abs(X - 0.15 * spine_cx) - p.mw, -0.9 - Y), 0.5)
    knob = fr.soft(np.sqrt((X - p.knob_x) ** 2 + (Y - p.knob_y) ** 2) - p.knob_r)
    med_all = np.maximum(np.maximum(med, knob), heart)
    f["med"] = med_all
    not_med = 1.0 - med_all
    # lungs: an ellipse cap above, slightly flaring walls below, cut by the dome and the mediastinum
    lungs, g_outer, domes = {}, {}, {}
    cxl = 0.5 * (p.lat + p.mw)
    a = 0.5 * (p.lat - p.mw)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        xm = X * sign
        apex, base = p.apex[side], p.base[side]
        cyl = apex + 0.42 * p.Lh
        w = 1.0 + 0.06 * np.clip((Y - cyl) * (1.0 / (base - cyl)), 0.0, 1.0)
        dy = np.minimum(Y - cyl, 0.0) * (1.0 / (cyl - apex))
        go = (np.sqrt(((xm - cxl) * (1.0 / a) / w) ** 2 + dy * dy) - 1.0) * a
        dome = _dome(p, side, xm)
        lungs[side] = fr.soft(np.maximum(go, Y - dome)) * not_med
        g_outer[side] = go
        domes[side] = dome
    f["lungs"], f["g_outer"] = lungs, g_outer
    f["lung_any"] = np.maximum(lungs["right"], lungs["left"])
    # body and abdomen
    bw = 0.32 + (p.body_w - 0.32) * _smooth01((Y + 0.75) * (1.0 / 0.55))
    body = fr.soft(np.abs(X) - bw, 0.35)
    f["body"], f["bw"] = body, bw
    dome_img = domes["right"] + (X > 0) * (domes["left"] - domes["right"])
    f["abdomen"] = fr.soft(dome_img - Y, 0.7) * body
    # trachea + main bronchi
    tx = _trachea_x(p, Y)
    trachea = fr.soft(np.maximum(np.abs(X - tx) - p.trach_w, Y - p.carina_y))
    cy_ = p.carina_y
    ctx = float(_trachea_x(p, np.float32(cy_)))
    p.carina_x = ctx
    br_r = _seg_dist(X, Y, ctx, cy_ - 0.02, ctx - 0.2, cy_ + 0.22) - 0.032
    br_l = _seg_dist(X, Y, ctx, cy_ - 0.02, ctx + 0.26, cy_ + 0.18) - 0.03
    f["trachea"] = np.maximum(trachea, fr.soft(np.minimum(br_r, br_l)))
    # spine with vertebral bodies (brighter) and discs (darker)
    spine = fr.soft(np.abs(X - spine_cx) - p.spine_w)
    ph = Y * (1.0 / p.vert_h)
    ph -= np.floor(ph)
    vert = 0.55 + 0.45 * _smooth01(np.minimum(ph, 1.0 - ph) * 7.0)
    f["spine"] = spine * vert
    # clavicles
    clav = None
    for sign in (-1.0, 1.0):
        xm = X * sign
        t = np.clip((xm - 0.08) * (1.0 / 0.9), 0.0, 1.0)
        yc = p.clav_y - p.clav_rise * t + 0.1 * t * (1 - t)
        g = np.maximum(np.abs(Y - yc) - (0.032 - 0.008 * t), np.maximum(0.08 - xm, xm - 1.0))
        c_ = fr.soft(g)
        clav = c_ if clav is None else np.maximum(clav, c_)
    f["clav"] = clav
    # ribs: periodic bands along curved coordinates (posterior and fainter anterior), inside the rib cage
    u = np.abs(X - 0.3 * spine_cx)
    post = (Y - (0.32 * u * u - 0.1 * u)) * (1.0 / p.rib_sp) / (1.0 + 0.15 / p.Lh * Y) + p.rib_phase
    fp = np.abs(post - np.floor(post) - 0.5)
    ribs = _smooth01((0.22 - fp) * 12.0) + 0.5 * _smooth01((0.05 - np.abs(fp - 0.2)) * 25.0)
    ant = (Y - 0.45 * (1.0 - u)) * (1.0 / (p.rib_sp * 1.25)) + 0.3
    fa = np.abs(ant - np.floor(ant) - 0.5)
    ribs += 0.45 * _smooth01((0.16 - fa) * 10.0) * _smooth01((u - 0.25) * 4.0)
    cage = fr.soft(np.maximum(u - (p.lat + 0.07), np.maximum(-0.15 - Y, Y - dome_img - 0.12)), 0.3)
    cage *= _smooth01((u - p.spine_w - 0.02) * 15.0)
    f["ribs"] = ribs * cage
    return f


def _region_boxes(fr: _Frame, p, masks) -> dict:
    """The 29 boxes from the drawn anatomy (full-resolution pixels)."""
    H, W = fr.height, fr.width
    boxes = {}
    s_px = fr.s
    for side in ("right", "left"):
        m = masks[f"{side} lung"]
        x1, y1, x2, y2 = _bbox(m)
        h, w = y2 - y1, x2 - x1
        boxes[f"{side} lung"] = (x1, y1, x2, y2)
        cuts = [y1, y1 + round(h / 3), y1 + round(2 * h / 3), y2]
        for k, zone in enumerate(("upper", "mid", "lower")):
            boxes[f"{side} {zone} lung zone"] = _sub_bbox(m, cuts[k], cuts[k + 1], (x1, y1, x2, y2))
        # apical zone: lung above the clavicle (at the lung's centre column), 8-30 % of the lung height
        sign = -1.0 if side == "right" else 1.0
        xm_c = 0.5 * (p.lat + p.mw)
        t = np.clip((xm_c - 0.08) / 0.9, 0, 1)
        _, clav_py = fr.to_pixel(sign * xm_c, p.clav_y - p.clav_rise * t + 0.1 * t * (1 - t) + 0.03)
        ap_bottom = int(np.clip(round(float(clav_py)), y1 + max(2, round(0.1 * h)), y1 + round(0.3 * h)))
        boxes[f"{side} apical zone"] = _sub_bbox(m, y1, ap_bottom, (x1, y1, x2, y2))
        # costophrenic angle: lateral lung base
        ya = y2 - max(3, round(0.2 * h))
        if side == "right":
            xa, xb = x1, x1 + max(3, round(0.4 * w))
        else:
            xa, xb = x2 - max(3, round(0.4 * w)), x2
        sub = np.zeros_like(m)
        sub[ya:y2, xa:xb] = m[ya:y2, xa:xb]
        bb = _bbox(sub) or (xa, ya, xb, y2)
        pad = max(2, round(0.04 * w))
        boxes[f"{side} costophrenic angle"] = _clip_box((bb[0] - pad, bb[1], bb[2] + pad, bb[3] + pad), W, H)
        # hemidiaphragm: around the dome line (lowest lung pixel of each column)
        cols = np.flatnonzero(m.any(0))
        bottoms = m.shape[0] - 1 - np.argmax(m[::-1, cols], axis=0)
        inner = cols[(cols >= x1 + 0.1 * w) & (cols <= x2 - 0.1 * w)]
        inner_b = bottoms[(cols >= x1 + 0.1 * w) & (cols <= x2 - 0.1 * w)]
        top = int(inner_b.min()) if inner_b.size else y2 - 3
        dpad = max(2, round(0.025 * H))
        boxes[f"{side} hemidiaphragm"] = _clip_box((x1, top - dpad, x2, int(bottoms.max()) + 1 + dpad), W, H)
        # hilar structures: medial part of the mid lung
        ya, yb = y1 + round(0.3 * h), y1 + round(0.62 * h)
        rows_cols = np.flatnonzero(m[ya:yb].any(0))
        if side == "right":
            medial = int(rows_cols.max()) + 1 if rows_cols.size else x2
            hb = (medial - 0.34 * w, ya, medial + 0.06 * w, yb)
        else:
            medial = int(rows_cols.min()) if rows_cols.size else x1
            hb = (medial - 0.06 * w, ya, medial + 0.34 * w, yb)
        boxes[f"{side} hilar structures"] = _clip_box(hb, W, H)
    # mediastinal structures from canonical geometry
    tw = p.trach_w
    ys = np.linspace(min(p.apex.values()) - 0.4, p.carina_y, 24)
    txs = _trachea_x(p, ys)
    boxes["trachea"] = fr.box_of_points(np.concatenate([txs - tw, txs + tw]), np.concatenate([ys, ys]))
    cx, cy = p.carina_x, p.carina_y
    boxes["carina"] = fr.box_of_points([cx - 0.1, cx + 0.1, cx - 0.1, cx + 0.1], [cy - 0.07, cy - 0.07, cy + 0.09, cy + 0.09])
    ys = np.linspace(-2.0, p.Lh + 2.0, 60)
    sc = _spine_x(p, ys)
    boxes["spine"] = fr.box_of_points(np.concatenate([sc - p.spine_w, sc + p.spine_w]), np.concatenate([ys, ys]))
    for side, sign in (("right", -1.0), ("left", 1.0)):
        t = np.linspace(0, 1, 12)
        xm = 0.08 + 0.92 * t
        yc = p.clav_y - p.clav_rise * t + 0.1 * t * (1 - t)
        boxes[f"{side} clavicle"] = fr.box_of_points(np.concatenate([sign * xm] * 2), np.concatenate([yc - 0.035, yc + 0.035]))
    kx, ky, kr = p.knob_x, p.knob_y, p.knob_r
    boxes["aortic arch"] = fr.box_of_points([p.trach_x + tw, kx + kr, p.trach_x + tw, kx + kr], [ky - kr, ky - kr, ky + kr, ky + kr])
    # heart contour points (canonical) for right-heart structures
    c, s = math.cos(p.heart_phi), math.sin(p.heart_phi)
    ang = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    hxs = p.heart_x + c * p.heart_a * np.cos(ang) - s * p.heart_b * np.sin(ang)
    hys = p.heart_y + s * p.heart_a * np.cos(ang) + c * p.heart_b * np.sin(ang)
    keep = hys <= p.heart_bottom
    hxs, hys = hxs[keep], hys[keep]
    heart_top = float(hys.min())
    right_edge = hxs < (hxs.min() + 0.25 * (hxs.max() - hxs.min()))
    rxs, rys = hxs[right_edge], hys[right_edge]
    boxes["right atrium"] = fr.box_of_points(np.concatenate([rxs, rxs + 0.16]), np.concatenate([rys, rys]))
    jy = float(rys.min())
    jx = float(rxs[np.argmin(rys)])
    boxes["cavoatrial junction"] = fr.box_of_points([jx - 0.07, jx + 0.09, jx - 0.07, jx + 0.09], [jy - 0.08, jy - 0.08, jy + 0.07, jy + 0.07])
    um_top = min(p.apex["right"], p.apex["left"]) - 0.05
    um_bottom = max(heart_top, p.carina_y + 0.05)
    boxes["upper mediastinum"] = fr.box_of_points([-p.mw - 0.03, kx + kr, -p.mw - 0.03, kx + kr], [um_top, um_top, um_bottom, um_bottom])
    boxes["svc"] = fr.box_of_points([-p.mw - 0.06, -p.mw + 0.07, -p.mw - 0.06, -p.mw + 0.07], [p.clav_y, p.clav_y, jy, jy])
    heart_box = _bbox(masks["heart"])
    boxes["cardiac silhouette"] = heart_box
    um = boxes["upper mediastinum"]
    boxes["mediastinum"] = _clip_box((min(um[0], heart_box[0]), um[1], max(um[2], heart_box[2]), heart_box[3]), W, H)
    # abdomen: below the higher of the two dome tops down to the image bottom
    rh, lh = boxes["right hemidiaphragm"], boxes["left hemidiaphragm"]
    ab_top = max(rh[1], lh[1]) + max(2, round(0.025 * H))
    ab_top = min(ab_top, H - 6)
    boxes["abdomen"] = _clip_box((boxes["right lung"][0], ab_top, boxes["left lung"][2], H), W, H)
    del s_px
    return {name: tuple(int(v) for v in boxes[name]) for name in ANATOMICAL_REGIONS}


def _sub_bbox(m, ya, yb, fallback):
    ya, yb = int(ya), int(max(yb, ya + 1))
    rows = m[ya:yb]
    bb = _bbox(rows)
    if bb is None:
        x1, _, x2, _ = fallback
        return (x1, ya, x2, yb)
    return (bb[0], bb[1] + ya, bb[2], bb[3] + ya)


def _pick_point(mask_box_region: np.ndarray, rng, fr: _Frame, box):
    x1, y1, x2, y2 = box
    sub = mask_box_region[y1:y2, x1:x2]
    idx = np.flatnonzero(sub.ravel()[:: 7])
    if idx.size == 0:
        px, py = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
    else:
        flat = int(idx[int(rng.integers(idx.size))]) * 7
        py, px = divmod(flat, x2 - x1)
        px, py = px + x1, py + y1
    return fr.to_canonical(px, py)


def _draw_findings(fr, p, fields, boxes, masks, specs, rng, blobs):
    """Render each finding; returns (list of (Finding, soft field, intensity delta field), drawn fields)."""
    X, Y = fr.X, fr.Y
    out = []
    lung_f = fields["lungs"]
    zone_name = {"upper": "upper lung zone", "mid": "mid lung zone", "lower": "lower lung zone"}
    for spec in specs:
        label, side, sev = spec["label"], spec["side"], spec["severity"]
        sev_k = {"mild": 0, "moderate": 1, "severe": 2}.get(sev, 1)
        items = []  # (side, region, regions, soft, amp, clip_draw)
        if label in ("lung opacity", "consolidation", "mass/nodule (not otherwise specified)", "atelectasis"):
            region = f"{side} {zone_name[spec['zone']]}"
            cxp, cyp = _pick_point(masks[f"{side} lung"], rng, fr, boxes[region])
            if label == "mass/nodule (not otherwise specified)":
                r = (0.045 if spec["size"] == "small" else 0.085) * rng.uniform(0.85, 1.15)
                soft = fr.soft(np.sqrt((X - cxp) ** 2 + (Y - cyp) ** 2) - r, 0.6)
                amp = 0.3
            elif label == "atelectasis":
                ang = rng.uniform(-0.3, 0.3)
                L = rng.uniform(0.12, 0.2) * (1 + 0.3 * sev_k)
                th = 0.012 + 0.008 * sev_k
                d = _seg_dist(X, Y, cxp - L * math.cos(ang), cyp - L * math.sin(ang), cxp + L * math.cos(ang), cyp + L * math.sin(ang))
                soft = fr.soft(d - th, 0.6) * lung_f[side]
                amp = 0.2
            else:
                r = rng.uniform(0.14, 0.2) * (1 + 0.25 * sev_k)
                rr = np.sqrt((X - cxp) ** 2 + ((Y - cyp) * 1.2) ** 2) / r
                edge = 1.6 if label == "lung opacity" else 3.0
                soft = np.clip((1.0 - rr) * edge + 0.35 * blobs + 0.3, 0.0, 1.0) * lung_f[side]
                amp = (0.13 if label == "lung opacity" else 0.22) + 0.04 * sev_k
            items.append((side, region, [region, f"{side} lung"], soft, amp, True))
        elif label == "pleural effusion":
            for s_ in (("right", "left") if spec.get("bilateral") else (side,)):
                sign = -1.0 if s_ == "right" else 1.0
                xm = sign * X
                hf = (0.1, 0.3, 0.6)[sev_k] * p.Lh * rng.uniform(0.8, 1.2)
                tl = np.clip((xm - p.mw) / (p.lat - p.mw), 0, 1)
                surface = _dome(p, s_, xm) - hf * (0.35 + 0.65 * tl ** 2) - 0.04 * (sev_k == 0)
                soft = fr.soft(surface - Y, 0.5) * lung_f[s_]  # below the fluid surface (meniscus)
                region = (f"{s_} costophrenic angle", f"{s_} lower lung zone", f"{s_} lung")[sev_k]
                regions = [f"{s_} costophrenic angle", f"{s_} lower lung zone", f"{s_} lung"][: max(2, sev_k + 1)]
                if f"{s_} lung" not in regions:
                    regions.append(f"{s_} lung")
                if sev_k == 0:
                    regions = [f"{s_} costophrenic angle", f"{s_} lung"]
                items.append((s_, region, regions, soft, 0.34, True))
        elif label == "pneumothorax":
            d = (0.05, 0.11, 0.2)[sev_k]
            ylim = p.apex[side] + (0.4, 0.7, 1.1)[sev_k] * p.Lh
            go = fields["g_outer"][side]
            taper = _smooth01((ylim - Y) / 0.15)
            # the rim of the lung within d of the chest wall / apex, above ylim
            soft = fr.soft(-go - d * taper) * lung_f[side] * (taper > 0.01)
            region = (f"{side} apical zone", f"{side} upper lung zone", f"{side} lung")[sev_k]
            regions = [region, f"{side} lung"] if region != f"{side} lung" else [f"{side} lung", f"{side} apical zone"]
            items.append((side, region, regions, soft, -0.12, True))
            spec["_line"] = (side, d, ylim)
        elif label == "enlarged cardiac silhouette":
            items.append((None, "cardiac silhouette", ["cardiac silhouette"], fields["heart"], 0.0, True))
        elif label == "elevated hemidiaphragm":
            sign = -1.0 if side == "right" else 1.0
            xm = sign * X
            band = np.abs(Y - _dome(p, side, xm)) - 0.035
            soft = fr.soft(np.maximum(band, np.maximum(p.mw - xm, xm - p.lat - 0.02)))
            items.append((side, f"{side} hemidiaphragm", [f"{side} hemidiaphragm"], soft, 0.0, True))
        elif label == "pulmonary edema/hazy opacity":
            for s_ in ("right", "left"):
                sign = -1.0 if s_ == "right" else 1.0
                hxc, hyc = sign * (p.mw + 0.18), p.apex[s_] + 0.5 * p.Lh
                rr = ((X - hxc) ** 2 + ((Y - hyc) * 0.8) ** 2) / (0.3 + 0.06 * sev_k) ** 2
                soft = np.clip(1.7 * np.exp(-rr) + 0.25 * blobs - 0.2, 0, 1) * lung_f[s_]
                items.append((s_, f"{s_} lung", [f"{s_} lung", f"{s_} hilar structures"], soft, 0.1 + 0.04 * sev_k, True))
        elif label == "scoliosis":
            sp = fr.soft(np.abs(X - fields["spine_cx"]) - p.spine_w)
            items.append((None, "spine", ["spine"], sp, 0.0, True))
        elif label == "endotracheal tube":
            tip = p.carina_y - rng.uniform(0.1, 0.22)
            spec["tip_cm"] = round((p.carina_y - tip) * 15.0 * 2 / 2, 1)
            tx = _trachea_x(p, Y) + 0.01
            tube = fr.soft(np.maximum(np.abs(X - tx) - 0.016, Y - tip))
            items.append((None, "trachea", ["trachea"], tube, 0.32, False))
        elif label == "enteric tube":
            ex = p.trach_x + 0.05
            yd = p.base["left"] + 0.05
            tipx, tipy = rng.uniform(0.3, 0.45), p.base["left"] + rng.uniform(0.18, 0.3)
            d = np.minimum(_seg_dist(X, Y, ex, -2.0, ex + 0.04, yd), _seg_dist(X, Y, ex + 0.04, yd, tipx, tipy))
            tube = fr.soft(d - 0.011)
            items.append((None, "abdomen", ["abdomen", "mediastinum"], tube, 0.3, False))
        for s_, region, regions, soft, amp, clip_draw in items:
            boxm = fr.render_box_mask(boxes[region])
            clipped = soft * boxm
            mask = _upsample_mask(clipped, fr)
            x1, y1, x2, y2 = boxes[region]
            inside = np.zeros_like(mask)
            inside[y1:y2, x1:x2] = mask[y1:y2, x1:x2]
            if inside.sum() < 4:
                continue
            finding = Finding(label=label, side=s_, severity=sev, region=region, regions=regions, mask_key="",
                              bilateral=bool(spec.get("bilateral")))
            out.append((finding, inside, clipped if clip_draw else soft, amp, spec))
    return out


def _compose(fr, p, fields, drawn, rng, vessels, blobs):
    """Attenuation-like intensity at render resolution (higher = brighter = denser)."""
    X, Y = fr.X, fr.Y
    lungs = fields["lung_any"]
    body = fields["body"]
    r = X / fields["bw"]
    r *= r
    I = 0.03 + body * (0.26 + 0.14 * np.maximum(1.0 - r * r, 0.0))
    I += 0.1 * fields["abdomen"]
    I += 0.13 * fields["med"]
    # lung darkness (upper zones darker), vascular markings stronger near the hila
    ax = np.abs(X) - (p.mw + 0.15)
    yy = Y - 0.5 * p.Lh
    hil = np.exp(-(ax * ax * (1.0 / 0.18) + yy * yy * (1.0 / 0.5)))
    markings = np.maximum(vessels, 0.0) * (0.02 + 0.08 * hil) + 0.02 * blobs
    for finding, _, soft, amp, spec in drawn:
        if finding.label == "pneumothorax":
            markings *= 1.0 - soft
            markings -= 0.05 * soft
    I -= lungs * (0.3 - 0.05 * np.clip(Y * (1.0 / p.Lh), 0.0, 1.0) - markings)
    I += 0.045 * fields["spine"] * (1.0 - 0.7 * lungs)
    I -= 0.1 * fields["trachea"] * (1.0 - lungs)
    I += (0.03 + 0.05 * lungs) * fields["ribs"] + 0.1 * fields["clav"]
    if p.bubble:
        gx, gy = (X - 0.42) * (1.0 / 0.16), (Y - p.base["left"] - 0.12) * (1.0 / 0.09)
        I -= 0.1 * fr.soft(np.sqrt(gx * gx + gy * gy) - 1.0, 0.3) * fields["abdomen"]
    for finding, _, soft, amp, spec in drawn:
        if finding.label == "pleural effusion":
            I += soft * (0.5 - I) * 0.9
        elif amp and finding.label != "pneumothorax":
            I += amp * soft
        if finding.label == "pneumothorax" and "_line" in spec:
            side, d, ylim = spec["_line"]
            go = fields["g_outer"][side]
            taper = _smooth01((ylim - Y) * (1.0 / 0.15))
            line = fr.soft(np.abs(go + d * taper) - 0.006) * (taper > 0.2) * fields["lungs"][side]
            I += 0.12 * line
    return I


def render_phantom(index: int, seed: int, size: int = 512) -> Phantom:
    """Render image ``index`` of the set with ``seed`` (deterministic in (seed, index, size))."""
    rng = np.random.default_rng([int(seed), int(index), int(size)])
    patient = _patient(seed, index)
    specs = _sample_findings(rng)
    for s in specs:
        if s["label"] == "scoliosis":
            s["convex"] = 1 if rng.random() < 0.5 else -1
    aspect = float(rng.uniform(0.85, 1.25))  # H / W
    if aspect >= 1.0:
        H, W = size, int(round(size / aspect))
    else:
        H, W = int(round(size * aspect)), size
    p = _anatomy_params(rng, patient, specs)
    for s in specs:
        if s["label"] == "scoliosis":
            p.scol_amp = abs(p.scol_amp) * s["convex"]
    theta = float(np.clip(rng.normal(0.0, 0.06), -0.1745, 0.1745))
    scale = W * rng.uniform(0.34, 0.4)
    scale = min(scale, 0.66 * H / (p.Lh + 0.1), 0.44 * W)
    cx = W * (0.5 + rng.normal(0, 0.015))
    top = H * rng.uniform(0.1, 0.16)
    cy = top + scale * (p.Lh / 2 + 0.05)
    fr = _Frame(H, W, scale, cx, cy, theta, p.Lh / 2, RENDER_FACTOR)
    vessels_bank, blobs_bank, grain_bank = _banks(size)
    vessels = _crop(vessels_bank, rng, (fr.hr, fr.wr))
    blobs = _crop(blobs_bank, rng, (fr.hr, fr.wr))

    fields = _render_anatomy(fr, p, rng)
    masks = {
        "right lung": _upsample_mask(fields["lungs"]["right"], fr),
        "left lung": _upsample_mask(fields["lungs"]["left"], fr),
        "heart": _upsample_mask(fields["heart"], fr),
    }
    boxes = _region_boxes(fr, p, masks)
    drawn = _draw_findings(fr, p, fields, boxes, masks, specs, rng, blobs)
    findings = []
    for j, (finding, mask, _, _, _) in enumerate(drawn):
        finding.mask_key = f"finding_{j}"
        masks[finding.mask_key] = mask
        findings.append(finding)

    I = _compose(fr, p, fields, drawn, rng, vessels, blobs)
    # exposure: window, gamma, contrast through a lookup table; film grain added at full resolution
    lo, hi = rng.uniform(0.0, 0.05), rng.uniform(0.68, 0.8)
    gamma = rng.uniform(0.8, 1.25)
    gain, offset = rng.uniform(200, 240), rng.uniform(0, 12)
    lut = np.clip((np.linspace(0.0, 1.0, 1024) ** gamma) * gain + offset, 0, 255).astype(np.uint8)
    idx = ((I - lo) * (1023.0 / (hi - lo))).astype(np.int32)
    np.clip(idx, 0, 1023, out=idx)
    low8 = Image.fromarray(lut[idx], "L")
    up = np.asarray(low8.resize((fr.wr * fr.factor, fr.hr * fr.factor), Image.BILINEAR))[:H, :W]
    grain = _crop(grain_bank[int(rng.integers(len(grain_bank)))], rng, (H, W))
    image = np.add(up, grain, dtype=np.int16)
    np.clip(image, 0, 255, out=image)
    image = image.astype(np.uint8)

    subject_id, study_id, dicom_id = make_ids(seed, index)
    report, sentences, chexpert = _write_report(rng, findings, specs, patient)
    scene_graph = _scene_graph(dicom_id, subject_id, study_id, patient, boxes, W, H, sentences, rng)
    return Phantom(index=int(index), seed=int(seed), image=image, boxes=boxes, masks=masks, findings=findings,
                   report=report, scene_graph=scene_graph, subject_id=subject_id, study_id=study_id,
                   dicom_id=dicom_id, split=split_of(seed, index), chexpert=chexpert)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------

ZONE_TEXT = {
    "upper lung zone": ("{side} upper lung", "{side} upper lobe", "{side} upper lung zone"),
    "mid lung zone": ("{side} mid lung", "{side} mid lung zone", "{side} perihilar region"),
    "lower lung zone": ("{side} lung base", "{side} lower lung", "{side} lower lobe", "{side} lower lung zone"),
}


class _Sentence:
    def __init__(self, text, section, regions=(), attrs=(), severity=(), texture=(), chexpert=None, uncertain=False):
        self.text, self.section = text, section
        self.regions, self.attrs = list(regions), list(attrs)
        self.severity, self.texture = list(severity), list(texture)
        self.chexpert = chexpert or {}
        self.uncertain = uncertain


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _finding_sentences(rng, label, group: list[Finding], spec) -> tuple[_Sentence, _Sentence]:
    """(findings-section sentence, impression sentence) for one finding (all its instances)."""
    f0 = group[0]
    sev = f0.severity
    sides = sorted({f.side for f in group if f.side}, key=["right", "left"].index)
    side = "bilateral" if len(sides) == 2 else (sides[0] if sides else "")
    regions = []
    for f in group:
        regions += [r for r in f.regions if r not in regions]
    yes = [f"{FINDING_CATEGORY[label]}|yes|{label}", "nlp|yes|abnormal"]
    sev_cue = [f"severity|yes|{sev}"] if sev else []
    uncertain = False
    cx = {}
    if label in ("lung opacity", "consolidation"):
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        if label == "lung opacity":
            options = [
                ("{Sev} opacity in the {loc}.", False, False),
                ("There is a {sev} patchy opacity in the {loc}.", False, False),
                ("{Sev} hazy opacity is seen in the {loc}.", False, False),
                ("Possible {sev} opacity in the {loc}.", True, False),
                ("{Sev} opacity in the {loc} may represent early pneumonia.", True, True),
            ]
            texture = ["texture|yes|patchy"]
            cx = {"Lung Opacity": 1.0}
        else:
            options = [
                ("{Sev} consolidation in the {loc}.", False, False),
                ("There is {sev} consolidation in the {loc}, concerning for pneumonia.", False, True),
                ("Focal {sev} airspace consolidation is present in the {loc}.", False, False),
                ("Possible {sev} consolidation in the {loc}.", True, False),
            ]
            texture = []
            cx = {"Consolidation": 1.0}
        tpl, uncertain, pneu = options[int(rng.integers(len(options)))]
        text = tpl.format(Sev=_cap(sev), sev=sev, loc=loc)
        attrs = yes + (["disease|yes|pneumonia"] if pneu else [])
        if pneu:
            cx["Pneumonia"] = -1.0
        imp = _Sentence(f"{_cap(sev)} {label} in the {loc}" + (", possibly pneumonia." if pneu else "."), "impression",
                        regions, attrs, sev_cue, texture, uncertain=uncertain)
        find = _Sentence(text, "findings", regions, attrs, sev_cue, texture, uncertain=uncertain)
    elif label == "pleural effusion":
        size = SIZE_WORD[sev]
        if side == "bilateral":
            options = [f"{_cap(size)} bilateral pleural effusions.", f"There are {size} bilateral pleural effusions.",
                       f"Bilateral pleural effusions, {size} in size, with blunting of the costophrenic angles."]
        else:
            options = [f"{_cap(size)} {side} pleural effusion.",
                       f"There is a {size} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                       f"{_cap(side)} pleural effusion, {size} in size.",
                       f"A {size} {side} pleural effusion may be present."]
        text = _choice(rng, options)
        uncertain = "may be" in text
        find = _Sentence(text, "findings", regions, yes, [f"severity|yes|{sev}"], [], uncertain=uncertain)
        # costophrenic angles also get blunting
        find.extra = {r: ["anatomicalfinding|yes|costophrenic angle blunting"] for r in regions if "costophrenic" in r}
        imp_text = f"{_cap(size)} {'bilateral pleural effusions' if side == 'bilateral' else side + ' pleural effusion'}."
        imp = _Sentence(imp_text, "impression", regions, yes, [f"severity|yes|{sev}"], [])
        imp.extra = find.extra
        cx = {"Pleural Effusion": -1.0 if uncertain else 1.0}
    elif label == "pneumothorax":
        size = SIZE_WORD[sev]
        options = [f"{_cap(size)} {side} apical pneumothorax.", f"There is a {size} {side} pneumothorax.",
                   f"A {side} pneumothorax is present, {size} in size.",
                   f"{_cap(size)} {side} pneumothorax with a visible pleural line."]
        text = _choice(rng, options)
        find = _Sentence(text, "findings", regions, yes, [f"severity|yes|{sev}"], [])
        imp = _Sentence(f"{_cap(size)} {side} pneumothorax.", "impression", regions, yes, [f"severity|yes|{sev}"], [])
        cx = {"Pneumothorax": 1.0}
    elif label == "atelectasis":
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        options = [(f"{_cap(sev)} linear atelectasis in the {loc}.", False),
                   (f"Plate-like atelectasis in the {loc}, {sev}.", False),
                   (f"Streaky opacity in the {loc} likely reflects {sev} atelectasis.", True),
                   (f"There is {sev} subsegmental atelectasis in the {loc}.", False)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, sev_cue, ["texture|yes|linear"], uncertain=uncertain)
        imp = _Sentence(f"{_cap(sev)} atelectasis in the {loc}.", "impression", regions, yes, sev_cue, ["texture|yes|linear"])
        cx = {"Atelectasis": 1.0}
    elif label == "enlarged cardiac silhouette":
        adv = ADVERB[sev]
        text = _choice(rng, [f"The heart is {adv} enlarged.", f"{_cap(sev)} cardiomegaly.",
                             f"The cardiac silhouette is {adv} enlarged.", f"Heart size is {adv} enlarged."])
        find = _Sentence(text, "findings", regions, yes, sev_cue, [])
        imp = _Sentence(f"{_cap(sev)} cardiomegaly.", "impression", regions, yes, sev_cue, [])
        cx = {"Cardiomegaly": 1.0}
    elif label == "mass/nodule (not otherwise specified)":
        zone = f0.region.split(" ", 1)[1]
        loc = _choice(rng, ZONE_TEXT[zone]).format(side=f0.side)
        size = spec.get("size", "small")
        options = [(f"A {size} nodule is seen in the {loc}.", False),
                   (f"{_cap(size)} nodular opacity in the {loc} may represent a pulmonary nodule.", True),
                   (f"There is a {size} rounded density in the {loc}, possibly a mass.", True),
                   (f"{_cap(size)} well-circumscribed nodule in the {loc}.", False)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, [], [], uncertain=uncertain)
        imp = _Sentence(f"{_cap(size)} {f0.side} lung nodule; recommend CT for further evaluation.", "impression",
                        regions, yes, [], [])
        cx = {"Lung Lesion": -1.0 if uncertain else 1.0}
    elif label == "elevated hemidiaphragm":
        text = _choice(rng, [f"Elevation of the {side} hemidiaphragm.", f"The {side} hemidiaphragm is elevated.",
                             f"There is mild elevation of the {side} hemidiaphragm.",
                             f"Elevated {side} hemidiaphragm, possibly due to eventration."])
        uncertain = "possibly" in text
        find = _Sentence(text, "findings", regions, yes, [], [], uncertain=uncertain)
        imp = _Sentence(f"Elevated {side} hemidiaphragm.", "impression", regions, yes, [], [])
    elif label == "pulmonary edema/hazy opacity":
        options = [(f"{_cap(sev)} pulmonary edema.", False),
                   (f"There is {sev} bilateral perihilar haziness consistent with pulmonary edema.", False),
                   (f"Bilateral hazy perihilar opacities may represent {sev} pulmonary edema.", True),
                   (f"Findings are suggestive of {sev} interstitial edema.", True)]
        text, uncertain = options[int(rng.integers(len(options)))]
        find = _Sentence(text, "findings", regions, yes, sev_cue, ["texture|yes|hazy"], uncertain=uncertain)
        imp = _Sentence(f"{_cap(sev)} pulmonary edema.", "impression", regions, yes, sev_cue, [])
        cx = {"Edema": -1.0 if uncertain else 1.0}
    elif label == "scoliosis":
        convex = "dextro" if spec.get("convex", 1) < 0 else "levo"  # convex to the patient's right = image left
        text = _choice(rng, [f"{_cap(sev)} scoliosis of the thoracic spine.", f"There is {sev} {convex}convex scoliosis.",
                             f"The thoracic spine demonstrates {sev} scoliosis."])
        find = _Sentence(text, "findings", regions, yes, sev_cue, [])
        imp = None
    elif label == "endotracheal tube":
        cm = max(2.0, min(6.0, float(spec.get("tip_cm", 4.0))))
        text = _choice(rng, [f"Endotracheal tube terminates {cm:.1f} cm above the carina.",
                             f"An endotracheal tube is in place with the tip approximately {cm:.1f} cm above the carina.",
                             "The endotracheal tube is in standard position above the carina."])
        attrs = [f"tubesandlines|yes|{label}"]
        find = _Sentence(text, "findings", regions, attrs, [], [])
        imp = _Sentence("Endotracheal tube in appropriate position.", "impression", regions, attrs, [], [])
        cx = {"Support Devices": 1.0}
    elif label == "enteric tube":
        text = _choice(rng, ["An enteric tube courses below the diaphragm with the tip in the stomach.",
                             "Enteric tube tip is in the stomach.",
                             "A nasogastric tube extends into the stomach."])
        attrs = [f"tubesandlines|yes|{label}"]
        find = _Sentence(text, "findings", regions, attrs, [], [])
        imp = None
        cx = {"Support Devices": 1.0}
    else:  # pragma: no cover
        raise ValueError(label)
    for f in group:
        f.uncertain = uncertain
    find.chexpert = cx
    return find, imp


def _negations(rng, findings: list[Finding]) -> list[_Sentence]:
    present = {(f.label, f.side) for f in findings}
    labels = {f.label for f in findings}
    lung_labels = {"lung opacity", "consolidation", "atelectasis", "pleural effusion", "pneumothorax",
                   "mass/nodule (not otherwise specified)", "pulmonary edema/hazy opacity"}
    out = []
    both = ["right lung", "left lung"]
    if not labels & lung_labels:
        out.append(_Sentence(_choice(rng, ["The lungs are clear.", "Lungs are clear bilaterally.",
                                           "The lungs are well expanded and clear."]),
                             "findings", both, ["anatomicalfinding|no|lung opacity", "nlp|yes|normal"]))
    elif "consolidation" not in labels and rng.random() < 0.7:
        out.append(_Sentence(_choice(rng, ["No focal consolidation.", "There is no focal consolidation."]), "findings",
                             both, ["anatomicalfinding|no|consolidation"], chexpert={"Consolidation": 0.0}))
    if "pneumothorax" not in labels:
        out.append(_Sentence(_choice(rng, ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."]),
                             "findings", both, ["anatomicalfinding|no|pneumothorax"], chexpert={"Pneumothorax": 0.0}))
    else:
        side = next(f.side for f in findings if f.label == "pneumothorax")
        other = "left" if side == "right" else "right"
        if rng.random() < 0.5:
            out.append(_Sentence(f"No {other} pneumothorax.", "findings", [f"{other} lung"],
                                 ["anatomicalfinding|no|pneumothorax"]))
    if "pleural effusion" not in labels:
        if rng.random() < 0.5:
            out.append(_Sentence(_choice(rng, ["No pleural effusion.", "There is no pleural effusion.",
                                               "No pleural effusions."]), "findings", both,
                                 ["anatomicalfinding|no|pleural effusion"], chexpert={"Pleural Effusion": 0.0}))
        else:
            out.append(_Sentence("The costophrenic angles are sharp without pleural effusion.", "findings",
                                 ["right costophrenic angle", "left costophrenic angle", "right lung", "left lung"],
                                 ["anatomicalfinding|no|costophrenic angle blunting",
                                  "anatomicalfinding|no|pleural effusion", "nlp|yes|normal"],
                                 chexpert={"Pleural Effusion": 0.0}))
    elif not any(f.label == "pleural effusion" and f.bilateral for f in findings):
        side = next(f.side for f in findings if f.label == "pleural effusion")
        other = "left" if side == "right" else "right"
        if rng.random() < 0.6:
            out.append(_Sentence(f"No {other} pleural effusion.", "findings", [f"{other} lung"],
                                 ["anatomicalfinding|no|pleural effusion"]))
    if "pulmonary edema/hazy opacity" not in labels and rng.random() < 0.4:
        out.append(_Sentence(_choice(rng, ["No pulmonary edema.", "There is no evidence of pulmonary edema."]),
                             "findings", both, ["anatomicalfinding|no|pulmonary edema/hazy opacity"],
                             chexpert={"Edema": 0.0}))
    if "enlarged cardiac silhouette" not in labels:
        if rng.random() < 0.5:
            out.insert(0, _Sentence(_choice(rng, ["Heart size is normal.", "The heart is normal in size.",
                                                  "The cardiac silhouette is within normal limits."]),
                                    "findings", ["cardiac silhouette"],
                                    ["anatomicalfinding|no|enlarged cardiac silhouette", "nlp|yes|normal"],
                                    chexpert={"Cardiomegaly": 0.0}))
        else:
            out.insert(0, _Sentence(_choice(rng, ["The cardiomediastinal silhouette is normal.",
                                                  "Cardiomediastinal contours are within normal limits."]),
                                    "findings", ["cardiac silhouette", "mediastinum"],
                                    ["anatomicalfinding|no|enlarged cardiac silhouette", "nlp|yes|normal"],
                                    chexpert={"Cardiomegaly": 0.0}))
    elif rng.random() < 0.5:
        out.append(_Sentence("The mediastinal contours are unremarkable.", "findings", ["mediastinum"], ["nlp|yes|normal"]))
    if rng.random() < 0.3:
        out.append(_Sentence("Hilar contours are normal.", "findings", ["right hilar structures", "left hilar structures"],
                             ["nlp|yes|normal"]))
    if "scoliosis" not in labels and rng.random() < 0.3:
        out.append(_Sentence("No acute osseous abnormality.", "findings", [], []))
    del present
    return out


INDICATIONS = (
    "___-year-old {sex} with shortness of breath.",
    "___-year-old {sex} with cough and fever, evaluate for pneumonia.",
    "History: ___{g} with chest pain.",
    "___-year-old {sex} with dyspnea, evaluate for effusion.",
    "Preoperative evaluation.",
    "___{g} with hypoxia.",
)


def _write_report(rng, findings: list[Finding], specs, patient):
    sex = "woman" if patient["gender"] == "F" else "man"
    indication = _choice(rng, INDICATIONS).format(sex=sex, g=patient["gender"])
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.label, []).append(f)
    spec_of = {s["label"]: s for s in specs}
    positives, impressions = [], []
    for label, group in groups.items():
        find, imp = _finding_sentences(rng, label, group, spec_of.get(label, {}))
        positives.append(find)
        if imp is not None:
            impressions.append(imp)
    negs = _negations(rng, findings)
    body = positives + negs if rng.random() < 0.6 else negs[:1] + positives + negs[1:]
    if not impressions:
        if findings:  # only incidental findings (scoliosis / enteric tube)
            impressions = [_Sentence("No acute cardiopulmonary process.", "impression")]
        else:
            impressions = [_Sentence(_choice(rng, ["No acute cardiopulmonary process.",
                                                   "No acute cardiopulmonary abnormality.",
                                                   "Normal chest radiograph."]), "impression")]
    sentences = body + impressions
    report = (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n\n"
        f" INDICATION:  {indication}\n\n"
        " COMPARISON:  None.\n\n"
        " FINDINGS:\n \n"
        " " + " ".join(s.text for s in body) + "\n \n"
        " IMPRESSION:\n \n"
        " " + " ".join(s.text for s in impressions) + "\n"
    )
    chexpert: dict[str, float | None] = {c: None for c in CHEXPERT_COLUMNS}
    for s in negs:
        chexpert.update(s.chexpert)
    for s in positives:
        for k, v in s.chexpert.items():
            if chexpert.get(k) != 1.0:
                chexpert[k] = v
    pathology = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices") and chexpert[c] in (1.0, -1.0)]
    if not pathology and not any(f.label not in ("endotracheal tube", "enteric tube") for f in findings):
        chexpert["No Finding"] = 1.0
    return report, sentences, chexpert


def _object_name(bbox_name: str) -> str:
    return "SVC" if bbox_name == "svc" else _cap(bbox_name)


def _scene_graph(dicom_id, subject_id, study_id, patient, boxes, W, H, sentences, rng) -> dict:
    scale = 224.0 / max(W, H)
    pad_x, pad_y = (224.0 - W * scale) / 2, (224.0 - H * scale) / 2
    objects = []
    for name in ANATOMICAL_REGIONS:
        x1, y1, x2, y2 = boxes[name]
        sx1, sy1 = int(round(x1 * scale + pad_x)), int(round(y1 * scale + pad_y))
        sx2, sy2 = int(round(x2 * scale + pad_x)), int(round(y2 * scale + pad_y))
        objects.append({
            "object_id": f"{dicom_id}_{name}", "x1": sx1, "y1": sy1, "x2": sx2, "y2": sy2,
            "width": sx2 - sx1, "height": sy2 - sy1, "bbox_name": name, "synsets": [], "name": _object_name(name),
            "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
            "original_width": x2 - x1, "original_height": y2 - y1,
        })
    per_region: dict[str, dict] = {}
    for s in sentences:
        extra = getattr(s, "extra", {})
        for region in s.regions:
            entry = per_region.setdefault(region, {
                "name": _object_name(region), "bbox_name": region, "synsets": [], "phrases": [], "attributes": [],
                "comparison_cues": [], "temporal_cues": [], "severity_cues": [], "texture_cues": [],
                "phrase_IDs": [], "sections": [],
            })
            attrs = list(s.attrs) + list(extra.get(region, []))
            if s.text in entry["phrases"]:
                k = entry["phrases"].index(s.text)
                entry["attributes"][k] = list(dict.fromkeys(entry["attributes"][k] + attrs))
                continue
            entry["phrases"].append(s.text)
            entry["attributes"].append(list(dict.fromkeys(attrs)))
            entry["comparison_cues"].append([])
            entry["temporal_cues"].append([])
            entry["severity_cues"].append(list(s.severity))
            entry["texture_cues"].append(list(s.texture))
            entry["phrase_IDs"].append(f"{study_id}|{sentences.index(s)}")
            entry["sections"].append("finalreport" if s.section == "findings" else "impression")
    attributes = [per_region[name] for name in ANATOMICAL_REGIONS if name in per_region]
    reasons = ("shortness of breath", "cough, fever", "chest pain", "dyspnea", "preoperative", "hypoxia")
    return {
        "image_id": dicom_id,
        "viewpoint": "PA",
        "patient_id": int(subject_id),
        "study_id": int(study_id),
        "gender": patient["gender"],
        "age_decile": patient["age_decile"],
        "reason_for_exam": _choice(rng, reasons),
        "StudyOrder": 1,
        "StudyDateTime": "",
        "objects": objects,
        "attributes": attributes,
        "relationships": [],
    }


# ----------------------------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------------------------


def _rel_paths(subject_id: int, study_id: int, dicom_id: str) -> dict[str, str]:
    p2 = f"p{str(subject_id)[:2]}"
    return {
        "jpg": f"mimic-cxr-jpg/files/{p2}/p{subject_id}/s{study_id}/{dicom_id}.jpg",
        "report": f"mimic-cxr-reports/files/{p2}/p{subject_id}/s{study_id}.txt",
        "scene_graph": f"chest-imagenome/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json",
        "masks": f"phantom/masks/{dicom_id}.npz",
        "dcm": f"files/{p2}/p{subject_id}/s{study_id}/{dicom_id}.dcm",
    }


_MADE_DIRS: set = set()


def _mkdir(path: Path) -> None:
    key = str(path)
    if key not in _MADE_DIRS:
        path.mkdir(parents=True, exist_ok=True)
        _MADE_DIRS.add(key)


def _write_one(out_dir: Path, index: int, seed: int, size: int) -> dict:
    ph = render_phantom(index, seed, size)
    paths = _rel_paths(ph.subject_id, ph.study_id, ph.dicom_id)
    jpg = out_dir / paths["jpg"]
    _mkdir(jpg.parent)
    buf = io.BytesIO()
    Image.fromarray(ph.image, "L").save(buf, "JPEG", quality=92)
    jpg.write_bytes(buf.getvalue())
    rep = out_dir / paths["report"]
    _mkdir(rep.parent)
    rep.write_text(ph.report)
    (out_dir / paths["scene_graph"]).write_text(json.dumps(ph.scene_graph))
    save_masks(out_dir / paths["masks"], ph.masks, ph.findings)
    rng = np.random.default_rng([seed, index, 99])
    date = 21000101 + int(rng.integers(0, 90)) * 10000 + int(rng.integers(0, 12)) * 100 + int(rng.integers(0, 28))
    time_ = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}"
    dice = sorted(rng.uniform(0.86, 0.97, size=2).tolist())
    return {
        "index": index, "dicom_id": ph.dicom_id, "subject_id": ph.subject_id, "study_id": ph.study_id,
        "split": ph.split, "avoid": ph.split == "test" and _avoid(seed, index), "height": ph.height,
        "width": ph.width, "date": date, "time": time_, "chexpert": ph.chexpert, "dcm": paths["dcm"],
        "left": rle_encode(ph.masks["left lung"]), "right": rle_encode(ph.masks["right lung"]),
        "heart": rle_encode(ph.masks["heart"]), "dice": dice,
    }


def _worker(args):
    out_dir, indices, seed, size = args
    return [_write_one(Path(out_dir), i, seed, size) for i in indices]


def _manifest_matches(out_dir: Path, n: int, seed: int, size: int) -> bool:
    path = out_dir / "phantom" / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not (m.get("complete") and m.get("n") == n and m.get("seed") == seed and m.get("size") == size
            and m.get("version") == GENERATOR_VERSION):
        return False
    required = [
        "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv",
        "mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv", "chexmask/MIMIC-CXR-JPG.csv",
        "chest-imagenome/silver_dataset/splits/train.csv",
    ]
    if not all((out_dir / r).is_file() for r in required):
        return False
    for i in {0, n - 1} if n > 0 else set():
        sid, stid, did = make_ids(seed, i)
        if not (out_dir / _rel_paths(sid, stid, did)["jpg"]).is_file():
            return False
    return True


_OUTPUT_SUBDIRS = ("mimic-cxr-jpg", "mimic-cxr-reports", "chest-imagenome", "chexmask", "phantom")


def generate_dataset(out_dir, n: int, seed: int, size: int = 512, workers: int = 1, progress: bool = True) -> Path:
    """Write ``n`` phantom studies under ``out_dir`` (layout in the module docstring); return ``out_dir``.

    A complete set with the same (n, seed, size, version) recorded in ``phantom/manifest.json`` is kept as is.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    n, seed, size, workers = int(n), int(seed), int(size), max(1, int(workers))
    if _manifest_matches(out_dir, n, seed, size):
        print(f"phantom: cached set in {out_dir} (n={n}, seed={seed}, size={size}, {GENERATOR_VERSION}); not regenerating")
        return out_dir
    _MADE_DIRS.clear()
    if (out_dir / "phantom" / "manifest.json").exists():  # an earlier (different or unfinished) phantom set
        for sub in _OUTPUT_SUBDIRS:
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    for sub in ("mimic-cxr-jpg", "mimic-cxr-reports", "chest-imagenome/silver_dataset/scene_graph",
                "chest-imagenome/silver_dataset/splits", "chexmask", "phantom/masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    manifest = {"generator": "anatomy-vlm phantom", "version": GENERATOR_VERSION, "n": n, "seed": seed,
                "size": size, "complete": False}
    (out_dir / "phantom" / "manifest.json").write_text(json.dumps(manifest, indent=2))

    chunk = 16
    jobs = [(str(out_dir), list(range(a, min(n, a + chunk))), seed, size) for a in range(0, n, chunk)]
    rows: list[dict] = []
    bar = tqdm(total=n, desc="phantom", unit="img", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            rows.extend(_worker(job))
            bar.update(len(job[1]))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for res in pool.imap(_worker, jobs):
                rows.extend(res)
                bar.update(len(res))
    bar.close()
    rows.sort(key=lambda r: r["index"])
    _write_tables(out_dir, rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validate", "test")}
    manifest.update({"complete": True, "splits": counts, "findings": list(FINDING_WEIGHTS),
                     "regions": list(ANATOMICAL_REGIONS), "render_factor": RENDER_FACTOR,
                     "box_convention": "pixel x1,y1,x2,y2 with exclusive x2,y2; scene graph 224 copy = aspect-"
                                       "preserving scale by 224/max(H,W) with centred padding",
                     "mask_npz_keys": ["shape", "names", "boxes", "bits_{k}", "finding_labels", "finding_regions",
                                       "finding_sides", "finding_severities"]})
    (out_dir / "phantom" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def _fmt(v):
    return "" if v is None else f"{v:.1f}"


def _write_tables(out_dir: Path, rows: list[dict]) -> None:
    def write(rel, header, lines):
        with open(out_dir / rel, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(lines)

    write("mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv", METADATA_COLUMNS, [
        (r["dicom_id"], r["subject_id"], r["study_id"], "CHEST (PA AND LAT)", "PA", r["height"], r["width"],
         r["date"], r["time"], "CHEST (PA AND LAT)", "postero-anterior", "Erect") for r in rows])
    write("mimic-cxr-jpg/mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"),
          [(r["dicom_id"], r["study_id"], r["subject_id"], r["split"]) for r in rows])
    write("mimic-cxr-jpg/mimic-cxr-2.0.0-chexpert.csv", ("subject_id", "study_id") + CHEXPERT_COLUMNS,
          [(r["subject_id"], r["study_id"], *(_fmt(r["chexpert"][c]) for c in CHEXPERT_COLUMNS)) for r in rows])
    split_files = {"train": "train", "validate": "valid", "test": "test"}
    for split, name in split_files.items():
        write(f"chest-imagenome/silver_dataset/splits/{name}.csv", ("subject_id", "study_id", "dicom_id", "path"),
              [(r["subject_id"], r["study_id"], r["dicom_id"], r["dcm"]) for r in rows if r["split"] == split])
    avoid = [r for r in rows if r["avoid"]]
    tests = [r for r in rows if r["split"] == "test"]
    if not avoid and tests:
        avoid = tests[:1]
    write("chest-imagenome/silver_dataset/splits/images_to_avoid.csv", ("dicom_id",), [(r["dicom_id"],) for r in avoid])
    write("chexmask/MIMIC-CXR-JPG.csv", CHEXMASK_COLUMNS, [
        (r["dicom_id"], f"{r['dice'][1]:.4f}", f"{r['dice'][0]:.4f}", "", r["left"], r["right"], r["heart"],
         r["height"], r["width"]) for r in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate a procedural phantom chest X-ray data set.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, required=True, help="number of images (one per study)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="long side of each image in pixels")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0 = all cores)")
    args = parser.parse_args(argv)
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    path = generate_dataset(args.out, args.n, args.seed, args.size, workers)
    print(f"phantom data set in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
