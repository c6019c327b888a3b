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
* Image ``i`` of a set uses its own RNG seeded from ``(seed, i, size)`` (its incidental findings a second one,
  ``(seed, i, size, 1)``); its patient (two studies per subject) uses one seeded from ``(seed, subject key)``:
  output does not depend on the worker count.

Modules: `anatomy` (canonical frame, patient, anatomy, region boxes), `findings` (sampling and drawing),
`report` (report, CheXpert labels, scene graph), `render` (one image: `render_phantom`), `ids` (ids, splits),
`masks` (the npz mask files), `layout` (the files of a set: `generate_dataset`, the CLI).

Usage::

    python -m train.data.phantom --out DIR --n 1000 --seed 0 [--size 512] [--workers K]
"""

from train.data.phantom.findings import DRAWN_FINDINGS, FINDING_WEIGHTS, Finding
from train.data.phantom.ids import make_ids, split_of, subject_key
from train.data.phantom.layout import (
    CHEXMASK_COLUMNS, GENERATOR_VERSION, METADATA_COLUMNS, generate_dataset, main,
)
from train.data.phantom.masks import load_masks, mask_box, save_masks
from train.data.phantom.render import Phantom, render_phantom
from train.data.phantom.report import CHEXPERT_COLUMNS

__all__ = [
    "CHEXMASK_COLUMNS", "CHEXPERT_COLUMNS", "DRAWN_FINDINGS", "FINDING_WEIGHTS", "Finding", "GENERATOR_VERSION",
    "METADATA_COLUMNS",
    "Phantom", "generate_dataset", "load_masks", "main", "make_ids", "mask_box", "render_phantom", "save_masks",
    "split_of", "subject_key",
]
