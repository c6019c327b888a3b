"""One phantom image: anatomy, findings, exposure and film grain, plus its report, scene graph and ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from train.data.phantom.anatomy import (
    Frame, anatomy_params, region_boxes, render_anatomy, sample_patient, smoothstep, upsample_mask,
)
from train.data.phantom.findings import Finding, draw_findings, sample_findings, sample_incidental_findings
from train.data.phantom.ids import make_ids, split_of
from train.data.phantom.report import build_scene_graph, write_report

RENDER_FACTOR = 3  # smooth anatomy is rendered at 1/RENDER_FACTOR resolution, then upsampled


@dataclass
class Phantom:
    """One rendered study: the image, its masks and region boxes, the findings drawn, report, scene graph, ids."""

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
# Composition and rendering
# ----------------------------------------------------------------------------------------------------------


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
            taper = smoothstep((ylim - Y) * (1.0 / 0.15))
            line = fr.soft(np.abs(go + d * taper) - 0.006) * (taper > 0.2) * fields["lungs"][side]
            I += 0.12 * line
    return I


def render_phantom(index: int, seed: int, size: int = 512) -> Phantom:
    """Render image ``index`` of the set with ``seed`` (deterministic in (seed, index, size))."""
    rng = np.random.default_rng([int(seed), int(index), int(size)])
    patient = sample_patient(seed, index)
    specs = sample_findings(rng) + sample_incidental_findings(seed, index, size)
    for s in specs:
        if s["label"] == "scoliosis":
            s["convex"] = 1 if rng.random() < 0.5 else -1
    aspect = float(rng.uniform(0.85, 1.25))  # H / W
    if aspect >= 1.0:
        H, W = size, int(round(size / aspect))
    else:
        H, W = int(round(size * aspect)), size
    p = anatomy_params(rng, patient, specs)
    for s in specs:
        if s["label"] == "scoliosis":
            p.scol_amp = abs(p.scol_amp) * s["convex"]
    theta = float(np.clip(rng.normal(0.0, 0.06), -0.1745, 0.1745))
    scale = W * rng.uniform(0.34, 0.4)
    scale = min(scale, 0.66 * H / (p.Lh + 0.1), 0.44 * W)
    cx = W * (0.5 + rng.normal(0, 0.015))
    top = H * rng.uniform(0.1, 0.16)
    cy = top + scale * (p.Lh / 2 + 0.05)
    fr = Frame(H, W, scale, cx, cy, theta, p.Lh / 2, RENDER_FACTOR)
    vessels_bank, blobs_bank, grain_bank = _banks(size)
    vessels = _crop(vessels_bank, rng, (fr.hr, fr.wr))
    blobs = _crop(blobs_bank, rng, (fr.hr, fr.wr))

    fields = render_anatomy(fr, p, rng)
    masks = {
        "right lung": upsample_mask(fields["lungs"]["right"], fr),
        "left lung": upsample_mask(fields["lungs"]["left"], fr),
        "heart": upsample_mask(fields["heart"], fr),
    }
    boxes = region_boxes(fr, p, masks)
    drawn = draw_findings(fr, p, fields, boxes, masks, specs, rng, blobs)
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
    report, sentences, chexpert = write_report(rng, findings, specs, patient)
    scene_graph = build_scene_graph(dicom_id, subject_id, study_id, patient, boxes, W, H, sentences, rng)
    return Phantom(index=int(index), seed=int(seed), image=image, boxes=boxes, masks=masks, findings=findings,
                   report=report, scene_graph=scene_graph, subject_id=subject_id, study_id=study_id,
                   dicom_id=dicom_id, split=split_of(seed, index), chexpert=chexpert)
