"""Findings: which ones an image gets (`sample_findings`) and how each is drawn into its region (`draw_findings`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from modeling_anatomy_vlm.configuration_anatomy_vlm import DEFAULT_FINDINGS
from train.data.phantom.anatomy import Frame, dome_y, segment_distance, smoothstep, trachea_x, upsample_mask

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
# Incidental findings and the fraction of images that get one: drawn with a generator of their own
# (`sample_incidental_findings`), so the images without one are the same as before they were added. The quickstart
# withholds "calcified nodule" from training (`data.unseen_findings`) and scores it by name.
INCIDENTAL_RATES = {"calcified nodule": 0.08}
DRAWN_FINDINGS = (*FINDING_WEIGHTS, *INCIDENTAL_RATES)  # every label this generator draws
assert all(label in DEFAULT_FINDINGS for label in DRAWN_FINDINGS)
assert "costophrenic angle blunting" in DEFAULT_FINDINGS


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


def sample_findings(rng: np.random.Generator) -> list[dict]:
    """0-3 finding specs (label, side, severity, zone, ...) without contradictory pleural combinations."""
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


def sample_incidental_findings(seed: int, index: int, size: int) -> list[dict]:
    """The incidental finding specs of image `index` (`INCIDENTAL_RATES`), from a generator of their own."""
    rng = np.random.default_rng([int(seed), int(index), int(size), 1])
    specs = []
    for label, rate in INCIDENTAL_RATES.items():
        if rng.random() < rate:
            side = "right" if rng.random() < 0.5 else "left"
            zone = str(rng.choice(["upper", "mid", "lower"]))
            specs.append({"label": label, "side": side, "severity": None, "zone": zone})
    return specs


def _pick_point(mask_box_region: np.ndarray, rng, fr: Frame, box):
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


def draw_findings(fr, p, fields, boxes, masks, specs, rng, blobs):
    """Render each finding; returns (list of (Finding, soft field, intensity delta field), drawn fields)."""
    X, Y = fr.X, fr.Y
    out = []
    lung_f = fields["lungs"]
    zone_name = {"upper": "upper lung zone", "mid": "mid lung zone", "lower": "lower lung zone"}
    for spec in specs:
        label, side, sev = spec["label"], spec["side"], spec["severity"]
        sev_k = {"mild": 0, "moderate": 1, "severe": 2}.get(sev, 1)
        items = []  # (side, region, regions, soft, amp, clip_draw)
        if label in ("lung opacity", "consolidation", "mass/nodule (not otherwise specified)", "atelectasis",
                     "calcified nodule"):
            region = f"{side} {zone_name[spec['zone']]}"
            cxp, cyp = _pick_point(masks[f"{side} lung"], rng, fr, boxes[region])
            if label == "calcified nodule":  # small, dense as bone, sharp-edged
                r = 0.03 * rng.uniform(0.85, 1.15)
                soft = fr.soft(np.sqrt((X - cxp) ** 2 + (Y - cyp) ** 2) - r, 1.5)
                amp = 0.45
            elif label == "mass/nodule (not otherwise specified)":
                r = (0.045 if spec["size"] == "small" else 0.085) * rng.uniform(0.85, 1.15)
                soft = fr.soft(np.sqrt((X - cxp) ** 2 + (Y - cyp) ** 2) - r, 0.6)
                amp = 0.3
            elif label == "atelectasis":
                ang = rng.uniform(-0.3, 0.3)
                L = rng.uniform(0.12, 0.2) * (1 + 0.3 * sev_k)
                th = 0.012 + 0.008 * sev_k
                d = segment_distance(X, Y, cxp - L * math.cos(ang), cyp - L * math.sin(ang), cxp + L * math.cos(ang), cyp + L * math.sin(ang))
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
                surface = dome_y(p, s_, xm) - hf * (0.35 + 0.65 * tl ** 2) - 0.04 * (sev_k == 0)
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
            taper = smoothstep((ylim - Y) / 0.15)
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
            band = np.abs(Y - dome_y(p, side, xm)) - 0.035
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
            tx = trachea_x(p, Y) + 0.01
            tube = fr.soft(np.maximum(np.abs(X - tx) - 0.016, Y - tip))
            items.append((None, "trachea", ["trachea"], tube, 0.32, False))
        elif label == "enteric tube":
            ex = p.trach_x + 0.05
            yd = p.base["left"] + 0.05
            tipx, tipy = rng.uniform(0.3, 0.45), p.base["left"] + rng.uniform(0.18, 0.3)
            d = np.minimum(segment_distance(X, Y, ex, -2.0, ex + 0.04, yd), segment_distance(X, Y, ex + 0.04, yd, tipx, tipy))
            tube = fr.soft(d - 0.011)
            items.append((None, "abdomen", ["abdomen", "mediastinum"], tube, 0.3, False))
        for s_, region, regions, soft, amp, clip_draw in items:
            boxm = fr.render_box_mask(boxes[region])
            clipped = soft * boxm
            mask = upsample_mask(clipped, fr)
            x1, y1, x2, y2 = boxes[region]
            inside = np.zeros_like(mask)
            inside[y1:y2, x1:x2] = mask[y1:y2, x1:x2]
            if inside.sum() < 4:
                continue
            finding = Finding(label=label, side=s_, severity=sev, region=region, regions=regions, mask_key="",
                              bilateral=bool(spec.get("bilateral")))
            out.append((finding, inside, clipped if clip_draw else soft, amp, spec))
    return out
