"""IU-Xray (Open-i "NLMCXR") reports + PNG images -> `datasets.Dataset` (schema: `train.data.common`)::

    load_iu_xray("iu-xray/ecgen-radiology", "iu-xray/NLMCXR_png", region_names=..., findings=...)
    load_iu_xray_root("iu-xray", region_names=config.region_names, findings=config.findings)

Each ``ecgen-radiology/{n}.xml`` is one report: ``AbstractText`` elements labelled COMPARISON / INDICATION /
FINDINGS / IMPRESSION, MeSH tags (``MeSH/major``, ``MeSH/minor``) and one ``parentImage id="CXR1_1_IM-0001-3001"``
per image, read from ``NLMCXR_png/CXR1_1_IM-0001-3001.png``. A row is an image, so a report with a frontal and a
lateral image gives two rows with the same report and labels. ``report`` holds the FINDINGS and IMPRESSION sections
as ``"FINDINGS: ...\\nIMPRESSION: ..."`` (``XXXX`` anonymisation tokens kept; `train.text.parser.parse_report` reads
past them); its labels come from `parse_report`, and findings it places in no modelled region still count for the
image-level labels. IU-Xray is an external test set: no official split (``split = "all"``), no patient ids
(``subject_id = ""``), no boxes (all NaN, so ``box_mask`` is all False).

Views: the format gives no per-image view, so there is no ``frontal_only`` option. The ``caption`` describes the
study ("Xray Chest PA and Lateral"), ``figureId`` / image order are not the view (torchxrayvision's own estimate,
``nlmcxr_tsne_pa.csv``, calls about 15% of the first-listed images lateral), and the DICOM ``ViewPosition`` is
missing for a third of the images and says "PA" for some laterals. Filter with a view classifier if you need one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import train.text.parser
from modeling_anatomy_vlm import AnatomyVLMConfig
from train.data.common import DataProblems, cached_dataset, features, file_signature, label_arrays, phrase_rows
from train.text.parser import parse_report
from train.text.region_texts import mentions_to_region_phrases

REPORT_SECTIONS = ("FINDINGS", "IMPRESSION")  # what the labels and the ``report`` column are made of
SPLIT = "all"


@dataclass(frozen=True)
class IUReport:
    """One Open-i report XML.

    Attributes:
        study_id: the ``uId`` ("CXR1"; the prefix of its image ids), or the file stem when the XML has none.
        sections: upper-cased ``AbstractText`` label -> text with whitespace collapsed ("" when empty).
        mesh: ``MeSH/major`` and ``MeSH/minor`` tags in document order ("Opacity/lung/base/left/mild", "normal").
        image_ids: the ``parentImage`` ids, in document order.
    """

    study_id: str
    sections: dict[str, str]
    mesh: list[str]
    image_ids: list[str]

    @property
    def text(self) -> str:
        """The FINDINGS and IMPRESSION sections that have text, one ``"LABEL: text"`` line each; "" if neither."""
        return "\n".join(f"{label}: {self.sections[label]}" for label in REPORT_SECTIONS if self.sections.get(label))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def read_report(path) -> IUReport:
    """Read one ``ecgen-radiology`` XML; a `ValueError` ``"malformed XML (...)"`` when it cannot be read as one."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"malformed XML ({error})") from error
    sections: dict[str, str] = {}
    for element in root.iter("AbstractText"):
        label, text = element.get("Label", "").upper(), _collapse("".join(element.itertext()))
        sections[label] = " ".join(filter(None, (sections.get(label, ""), text)))
    mesh = [_collapse(e.text) for e in root.iterfind("MeSH/*")
            if e.tag in ("major", "minor") and (e.text or "").strip()]
    image_ids = []
    for image in root.iterfind("parentImage"):
        if not image.get("id"):
            raise ValueError("malformed XML (a parentImage has no id)")
        image_ids.append(image.get("id"))
    uid = root.find("uId")
    study_id = uid.get("id") if uid is not None and uid.get("id") else path.stem
    return IUReport(study_id, sections, mesh, image_ids)


def _report_labels(text: str, region_names: Sequence[str], findings: Sequence[str]):
    """(RegionPhrases, region labels [R, F], global labels [F]) of a report's text."""
    mentions = parse_report(text)
    names = set(region_names)
    region_phrases = {r: entries for r, entries in mentions_to_region_phrases(mentions).items() if r in names}
    # "No pneumothorax." names no region, but it is still a statement about the image
    elsewhere = [(m.category, m.present, m.finding) for m in mentions if m.region not in names]
    region_labels, global_labels = label_arrays(region_phrases, findings, region_names, elsewhere)
    return region_phrases, region_labels, global_labels


def _report_order(path: Path):
    """1.xml, 2.xml, ..., 10.xml (numeric stems in number order, then any others by name)."""
    return (0, int(path.stem), "") if re.fullmatch(r"\d+", path.stem) else (1, 0, path.stem)


def load_iu_xray(
    reports_dir,
    images_dir,
    *,
    region_names: Sequence[str],
    findings: Sequence[str],
    on_error: str = "skip",
    max_images: int | None = None,
    cache_dir=None,
    overwrite_cache: bool = False,
):
    """IU-Xray as one `datasets.Dataset` (columns in `train.data.common`, one row per image), Arrow-cached.

    Args:
        reports_dir: the ``ecgen-radiology/`` folder of ``*.xml`` reports.
        images_dir: the ``NLMCXR_png/`` folder of ``{parentImage id}.png`` images.
        on_error: ``"skip"`` counts and logs bad reports (malformed XML, no FINDINGS and no IMPRESSION text) and
            bad images (missing, unreadable); ``"raise"`` stops at the first with a `ValueError` naming the file.
            Reports that name no image are counted either way: the collection ships such reports.
        max_images: keep the first N images, reports taken in file-number order (quick experiments).
    """
    reports_dir, images_dir = Path(reports_dir), Path(images_dir)
    if not reports_dir.is_dir():
        raise FileNotFoundError(f"load_iu_xray: {reports_dir}: report folder (ecgen-radiology/) not found")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"load_iu_xray: {images_dir}: image folder (NLMCXR_png/) not found")
    xml_files = sorted(reports_dir.glob("*.xml"), key=_report_order)
    if not xml_files:
        raise FileNotFoundError(f"load_iu_xray: {reports_dir}: no *.xml reports in the folder")
    key = {
        "reports": str(reports_dir.resolve()), "images": str(images_dir.resolve()),
        "regions": list(region_names), "findings": list(findings), "max_images": max_images, "on_error": on_error,
        "sources": [file_signature(reports_dir), file_signature(images_dir)],
        # a report edited in place leaves its folder's mtime alone; the labels also depend on the parser's code
        "xml": [f"{p.name}:{file_signature(p)}" for p in xml_files],
        "parser": file_signature(train.text.parser.__file__),
    }

    def build():
        from PIL import Image, UnidentifiedImageError
        from tqdm import tqdm

        problems = DataProblems("iu_xray", on_error)
        rows: list[dict] = []
        no_boxes = np.full((len(region_names), 4), np.nan, dtype=np.float32)
        bar = tqdm(xml_files, desc="iu_xray index", unit="report", mininterval=2.0, disable=len(xml_files) < 2000)
        for xml in bar:
            if max_images is not None and len(rows) >= max_images:
                break
            try:
                report = read_report(xml)
            except ValueError as error:
                problems.problem("malformed XML", xml, str(error))
                continue
            if not report.image_ids:
                problems.count("reports without images")
                continue
            text = report.text
            if not text:
                problems.problem("empty report", xml, "no FINDINGS and no IMPRESSION text")
                continue
            region_phrases, region_labels, global_labels = _report_labels(text, region_names, findings)
            for image_id in report.image_ids:
                png = images_dir / f"{image_id}.png"
                try:
                    with Image.open(png) as image:  # reads the header only
                        width, height = image.size
                except FileNotFoundError:
                    problems.problem("image missing", png, "image file not found")
                    continue
                except (OSError, UnidentifiedImageError) as error:
                    problems.problem("image unreadable", png, f"not a readable image ({error})")
                    continue
                rows.append({
                    "image": str(png),
                    "image_id": image_id,
                    "study_id": report.study_id,
                    "subject_id": "",
                    "split": SPLIT,
                    "report": text,
                    "width": width,
                    "height": height,
                    "boxes": no_boxes,
                    "region_phrases": phrase_rows(region_phrases),
                    "region_labels": region_labels,
                    "global_labels": global_labels.tolist(),
                    "mesh": report.mesh,
                })
        return rows[:max_images], problems

    return cached_dataset("iu_xray", key, build, features(len(region_names), len(findings)),
                          cache_dir=cache_dir, overwrite=overwrite_cache)


def load_iu_xray_root(root, split: str = SPLIT, **kwargs):
    """IU-Xray from one folder holding ``ecgen-radiology/`` and ``NLMCXR_png/`` (the layout of the downloads)."""
    if split != SPLIT:
        raise ValueError(f"IU-Xray has one split, {SPLIT!r}; got {split!r}")
    root = Path(root)
    return load_iu_xray(root / "ecgen-radiology", root / "NLMCXR_png", **kwargs)


def main(argv=None) -> None:
    """Index IU-Xray (and fill the Arrow cache); prints the counts and the time taken."""
    import argparse
    import logging
    import time

    parser = argparse.ArgumentParser(description="Index IU-Xray (Open-i NLMCXR) reports and images into the Arrow "
                                                 "cache.")
    parser.add_argument("--reports", required=True, help="the ecgen-radiology/ folder of XML reports")
    parser.add_argument("--images", required=True, help="the NLMCXR_png/ folder of PNG images")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--overwrite-cache", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    defaults = AnatomyVLMConfig()  # the default regions and findings
    dataset = load_iu_xray(args.reports, args.images, region_names=defaults.region_names, findings=defaults.findings,
                           max_images=args.max_images, overwrite_cache=args.overwrite_cache)
    seconds = time.perf_counter() - start
    reports = len(set(dataset["study_id"]))
    print(f"{len(dataset)} images from {reports} reports in {seconds:.1f} s "
          f"({1e4 * seconds / max(1, len(dataset)):.1f} s per 10k images)")


if __name__ == "__main__":
    main()
