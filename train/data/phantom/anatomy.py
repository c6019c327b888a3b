"""The drawn anatomy: the canonical frame, the patient, the anatomy fields and the 29 region boxes.

Canonical anatomy frame: x = 0 is the midline, x > 0 is IMAGE right (patient left), y grows downwards,
the thorax half-width is 1, the lung apices sit near y = 0 and the costophrenic angles near y = Lh.
A similarity transform (scale, shift, rotation, `Frame`) maps it to pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from train.data.phantom.ids import subject_key
from train.data.phantom.masks import mask_box

# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------


def smoothstep(t):
    """0 below 0, 1 above 1, a smooth cubic between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class Frame:
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


def segment_distance(X, Y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-9
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) * (1.0 / L2), 0.0, 1.0)
    return np.sqrt((X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2)


def upsample_mask(soft: np.ndarray, frame: Frame) -> np.ndarray:
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
# Patient and anatomy parameters
# ----------------------------------------------------------------------------------------------------------


def sample_patient(seed: int, index: int) -> dict:
    """Demographics and body proportions, shared by the studies of one subject."""
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


class _Scene:
    """Anatomy parameters and the render-resolution fields of one image."""


def anatomy_params(rng, patient, specs):
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


def dome_y(p, side, xm):
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


def trachea_x(p, Y):
    return p.trach_x - 0.02 * np.exp(-(((Y - p.knob_y) * 5.0) ** 2)) + 0.3 * _spine_x(p, Y)


# ----------------------------------------------------------------------------------------------------------
# Anatomy fields and region boxes
# ----------------------------------------------------------------------------------------------------------


def render_anatomy(fr: Frame, p, rng):
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
        dome = dome_y(p, side, xm)
        lungs[side] = fr.soft(np.maximum(go, Y - dome)) * not_med
        g_outer[side] = go
        domes[side] = dome
    f["lungs"], f["g_outer"] = lungs, g_outer
    f["lung_any"] = np.maximum(lungs["right"], lungs["left"])
    # body and abdomen
    bw = 0.32 + (p.body_w - 0.32) * smoothstep((Y + 0.75) * (1.0 / 0.55))
    body = fr.soft(np.abs(X) - bw, 0.35)
    f["body"], f["bw"] = body, bw
    dome_img = domes["right"] + (X > 0) * (domes["left"] - domes["right"])
    f["abdomen"] = fr.soft(dome_img - Y, 0.7) * body
    # trachea + main bronchi
    tx = trachea_x(p, Y)
    trachea = fr.soft(np.maximum(np.abs(X - tx) - p.trach_w, Y - p.carina_y))
    cy_ = p.carina_y
    ctx = float(trachea_x(p, np.float32(cy_)))
    p.carina_x = ctx
    br_r = segment_distance(X, Y, ctx, cy_ - 0.02, ctx - 0.2, cy_ + 0.22) - 0.032
    br_l = segment_distance(X, Y, ctx, cy_ - 0.02, ctx + 0.26, cy_ + 0.18) - 0.03
    f["trachea"] = np.maximum(trachea, fr.soft(np.minimum(br_r, br_l)))
    # spine with vertebral bodies (brighter) and discs (darker)
    spine = fr.soft(np.abs(X - spine_cx) - p.spine_w)
    ph = Y * (1.0 / p.vert_h)
    ph -= np.floor(ph)
    vert = 0.55 + 0.45 * smoothstep(np.minimum(ph, 1.0 - ph) * 7.0)
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
    ribs = smoothstep((0.22 - fp) * 12.0) + 0.5 * smoothstep((0.05 - np.abs(fp - 0.2)) * 25.0)
    ant = (Y - 0.45 * (1.0 - u)) * (1.0 / (p.rib_sp * 1.25)) + 0.3
    fa = np.abs(ant - np.floor(ant) - 0.5)
    ribs += 0.45 * smoothstep((0.16 - fa) * 10.0) * smoothstep((u - 0.25) * 4.0)
    cage = fr.soft(np.maximum(u - (p.lat + 0.07), np.maximum(-0.15 - Y, Y - dome_img - 0.12)), 0.3)
    cage *= smoothstep((u - p.spine_w - 0.02) * 15.0)
    f["ribs"] = ribs * cage
    return f


def region_boxes(fr: Frame, p, masks) -> dict:
    """The 29 boxes from the drawn anatomy (full-resolution pixels)."""
    H, W = fr.height, fr.width
    boxes = {}
    for side in ("right", "left"):
        m = masks[f"{side} lung"]
        x1, y1, x2, y2 = mask_box(m)
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
        bb = mask_box(sub) or (xa, ya, xb, y2)
        pad = max(2, round(0.04 * w))
        boxes[f"{side} costophrenic angle"] = _clip_box((bb[0] - pad, bb[1], bb[2] + pad, bb[3] + pad), W, H)
        # hemidiaphragm: around the dome line (lowest lung pixel of each column)
        cols = np.flatnonzero(m.any(0))
        bottoms = m.shape[0] - 1 - np.argmax(m[::-1, cols], axis=0)
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
    txs = trachea_x(p, ys)
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
    heart_box = mask_box(masks["heart"])
    boxes["cardiac silhouette"] = heart_box
    um = boxes["upper mediastinum"]
    boxes["mediastinum"] = _clip_box((min(um[0], heart_box[0]), um[1], max(um[2], heart_box[2]), heart_box[3]), W, H)
    # abdomen: below the higher of the two dome tops down to the image bottom
    rh, lh = boxes["right hemidiaphragm"], boxes["left hemidiaphragm"]
    ab_top = max(rh[1], lh[1]) + max(2, round(0.025 * H))
    ab_top = min(ab_top, H - 6)
    boxes["abdomen"] = _clip_box((boxes["right lung"][0], ab_top, boxes["left lung"][2], H), W, H)
    return {name: tuple(int(v) for v in boxes[name]) for name in ANATOMICAL_REGIONS}


def _sub_bbox(m, ya, yb, fallback):
    ya, yb = int(ya), int(max(yb, ya + 1))
    rows = m[ya:yb]
    bb = mask_box(rows)
    if bb is None:
        x1, _, x2, _ = fallback
        return (x1, ya, x2, yb)
    return (bb[0], bb[1] + ya, bb[2], bb[3] + ya)
