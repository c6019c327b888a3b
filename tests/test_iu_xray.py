"""IU-Xray loader on hand-written Open-i XML reports, and on the real reports shipped in the torchxrayvision wheel."""

import functools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS, AnatomyVLMConfig, AnatomyVLMImageProcessor
from train.data.common import make_transform, region_phrases_of
from train.data.iu_xray import load_iu_xray as load_iu_xray_with
from train.data.iu_xray import read_report

DEFAULTS = AnatomyVLMConfig()
load_iu_xray = functools.partial(load_iu_xray_with, region_names=DEFAULTS.region_names, findings=DEFAULTS.findings)



def _xml(uid, findings, impression, mesh=(), images=(), comparison="None.", indication="XXXX-year-old male, cough."):
    """An Open-i ``ecgen-radiology`` report (abridged: the bibliographic parts are cut short)."""
    mesh_tags = "".join(f"\n      <{kind}>{tag}</{kind}>" for kind, tag in mesh)
    parents = "".join(f"""
   <parentImage id="{image_id}">
      <figureId>F{i + 1}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{image_id}.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>""" for i, image_id in enumerate(images))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{uid[3:]}"/>
   <docSource>CXR</docSource>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">{comparison}</AbstractText>
            <AbstractText Label="INDICATION">{indication}</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{mesh_tags}
      <automatic>pleural effusion</automatic>
   </MeSH>{parents}
</eCitation>
"""


REPORTS = {
    "1": dict(
        findings="Small left pleural effusion. No pneumothorax. There are no XXXX of pulmonary edema.",
        impression="Small left pleural effusion, XXXX new.",
        mesh=[("major", "Pleural Effusion/left/small"), ("minor", "Thoracic Vertebrae/degenerative")],
        images={"CXR1_1_IM-0001-3001": (300, 250), "CXR1_1_IM-0001-4001": (250, 300)},
    ),
    "2": dict(findings="", impression="Cardiomegaly. The lungs are clear.", mesh=[("major", "Cardiomegaly/mild")],
              images={"CXR2_IM-0652-1001": (300, 250)}),
    "10": dict(findings="The heart is normal in size. The lungs are clear. No pneumothorax or pleural effusion.",
               impression="Normal chest x-XXXX.", mesh=[("major", "normal")],
               images={"CXR10_IM-0002-1001": (300, 250), "CXR10_IM-0002-2001": (300, 250)}),
}


def _write(reports_dir, images_dir, number, report):
    (reports_dir / f"{number}.xml").write_text(
        _xml(f"CXR{number}", report["findings"], report["impression"], report["mesh"], report["images"]))
    for image_id, (width, height) in report["images"].items():
        Image.new("L", (width, height), 128).save(images_dir / f"{image_id}.png")


@pytest.fixture
def iu_dirs(tmp_path):
    reports_dir, images_dir = tmp_path / "ecgen-radiology", tmp_path / "NLMCXR_png"
    reports_dir.mkdir()
    images_dir.mkdir()
    for number, report in REPORTS.items():
        _write(reports_dir, images_dir, number, report)
    return reports_dir, images_dir


def _value(labels, finding, region=None):
    labels = np.asarray(labels)
    j = DEFAULT_FINDINGS.index(finding)
    return int(labels[j] if region is None else labels[ANATOMICAL_REGIONS.index(region), j])


def test_one_row_per_image_with_report_and_sizes(iu_dirs, dataset_cache):
    reports_dir, images_dir = iu_dirs
    dataset = load_iu_xray(reports_dir, images_dir)
    expected = [(f"CXR{n}", image_id, size) for n in ("1", "2", "10")
                for image_id, size in REPORTS[n]["images"].items()]
    assert [(r["study_id"], r["image_id"], (r["width"], r["height"])) for r in dataset] == expected
    row = dataset[0]
    assert row["image"]["path"] == str(images_dir / "CXR1_1_IM-0001-3001.png") and row["image"]["bytes"] is None
    assert (row["subject_id"], row["split"]) == ("", "all")
    assert row["report"] == ("FINDINGS: Small left pleural effusion. No pneumothorax. There are no XXXX of pulmonary "
                             "edema.\nIMPRESSION: Small left pleural effusion, XXXX new.")
    assert dataset[2]["report"] == "IMPRESSION: Cardiomegaly. The lungs are clear."  # no empty FINDINGS line
    assert row["mesh"] == ["Pleural Effusion/left/small", "Thoracic Vertebrae/degenerative"]  # not <automatic>
    assert dataset[1]["report"] == row["report"] and dataset[1]["global_labels"] == row["global_labels"]


def test_labels_from_the_report_text(iu_dirs, dataset_cache):
    dataset = load_iu_xray(*iu_dirs)
    effusion, normal_study, cardiomegaly = dataset[0], dataset[3], dataset[2]
    assert _value(effusion["region_labels"], "pleural effusion", "left costophrenic angle") == 1
    assert _value(effusion["region_labels"], "pleural effusion", "right costophrenic angle") == -1
    assert _value(effusion["global_labels"], "pleural effusion") == 1
    assert _value(effusion["global_labels"], "pneumothorax") == 0  # region-less, still counted for the image
    assert _value(effusion["global_labels"], "pulmonary edema/hazy opacity") == 0  # "no XXXX of" read past
    assert _value(effusion["global_labels"], "atelectasis") == -1
    phrases = region_phrases_of(effusion["region_phrases"])
    assert "Small left pleural effusion" in [p for p, _ in phrases["left costophrenic angle"]]
    assert _value(cardiomegaly["region_labels"], "enlarged cardiac silhouette", "cardiac silhouette") == 1
    assert _value(cardiomegaly["global_labels"], "enlarged cardiac silhouette") == 1
    assert _value(normal_study["global_labels"], "enlarged cardiac silhouette") == 0
    assert 1 not in normal_study["global_labels"]
    assert _value(normal_study["global_labels"], "pleural effusion") == 0


def test_no_boxes_so_the_box_mask_is_empty(iu_dirs, dataset_cache):
    dataset = load_iu_xray(*iu_dirs)
    assert np.isnan(np.asarray(dataset["boxes"])).all()
    dataset.set_transform(make_transform(AnatomyVLMImageProcessor(size=64), on_error="raise"))
    batch = dataset[0:2]
    assert batch["image_ok"] == [True, True]
    assert tuple(batch["pixels"][0].shape) == (1, 64, 64) and batch["pixels"][0].dtype == torch.uint8
    assert batch["original_sizes"][1].tolist() == [300, 250]  # (H, W) of the 250 x 300 image
    assert not any(mask.any() for mask in batch["box_mask"])


def test_bad_reports_and_images_skipped_and_counted_or_raised(iu_dirs, dataset_cache, caplog):
    reports_dir, images_dir = iu_dirs
    (reports_dir / "3.xml").write_text(_xml("CXR3", "No acute disease.", "Normal.", images=["CXR3_IM-1"])[:400])
    _write(reports_dir, images_dir, "4", dict(findings="", impression="  ", mesh=[], images={"CXR4_IM-1": (300, 250)}))
    (images_dir / "CXR10_IM-0002-2001.png").unlink()
    (reports_dir / "5.xml").write_text(_xml("CXR5", "Normal.", "Normal.", images=[]))  # a report without images
    with pytest.raises(ValueError, match=r"3\.xml: malformed XML \("):
        load_iu_xray(reports_dir, images_dir, on_error="raise")
    (reports_dir / "3.xml").rename(reports_dir / "3.bad")
    with pytest.raises(ValueError, match=r"4\.xml: no FINDINGS and no IMPRESSION text"):
        load_iu_xray(reports_dir, images_dir, on_error="raise")
    (reports_dir / "4.xml").rename(reports_dir / "4.bad")
    with pytest.raises(ValueError, match=r"CXR10_IM-0002-2001\.png: image file not found"):
        load_iu_xray(reports_dir, images_dir, on_error="raise")
    (reports_dir / "3.bad").rename(reports_dir / "3.xml")
    (reports_dir / "4.bad").rename(reports_dir / "4.xml")
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        dataset = load_iu_xray(reports_dir, images_dir, on_error="skip")
    assert dataset["image_id"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001",
                                   "CXR10_IM-0002-1001"]
    assert ("iu_xray: 4 images; empty report 1, image missing 1, malformed XML 1, reports without images 1"
            in caplog.text)
    assert "3.xml: malformed XML (" in caplog.text and "4.xml: no FINDINGS and no IMPRESSION text" in caplog.text
    assert "CXR10_IM-0002-2001.png: image file not found" in caplog.text


def test_max_images_and_second_load_from_the_arrow_cache(iu_dirs, dataset_cache, monkeypatch):
    assert load_iu_xray(*iu_dirs, max_images=2)["image_id"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    first = load_iu_xray(*iu_dirs)
    import train.data.iu_xray as module

    def fail(path):
        raise AssertionError("reports parsed again")

    monkeypatch.setattr(module, "read_report", fail)
    second = load_iu_xray(*iu_dirs)
    assert second["image_id"] == first["image_id"] and second["global_labels"] == first["global_labels"]
    assert second.features["image"].decode is False
    (iu_dirs[0] / "2.xml").write_text((iu_dirs[0] / "2.xml").read_text().replace("Cardiomegaly.", "No cardiomegaly."))
    with pytest.raises(AssertionError, match="parsed again"):  # an edited report is a cache miss
        load_iu_xray(*iu_dirs)


def test_wrong_paths_name_what_is_missing(tmp_path, iu_dirs):
    with pytest.raises(FileNotFoundError, match="report folder"):
        load_iu_xray(tmp_path / "nope", iu_dirs[1])
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_iu_xray(iu_dirs[0], tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no \*\.xml reports"):
        load_iu_xray(iu_dirs[1], iu_dirs[1])


# --------------------------------------------------------------------------------------------- real reports
def test_every_real_report_parses(real_reports):
    reports = [read_report(path) for path in real_reports.glob("*.xml")]
    assert len(reports) > 3900
    images = [i for r in reports for i in r.image_ids]
    assert len(images) > 7000 and len(set(images)) == len(images)
    assert all(i.startswith(r.study_id + "_") for r in reports for i in r.image_ids)
    assert sum(not r.text for r in reports) / len(reports) < 0.02
    assert sum(r.mesh == ["normal"] for r in reports) / len(reports) > 0.3


def test_real_reports_load_with_sensible_labels(real_reports, tmp_path, dataset_cache):
    reports_dir, images_dir = tmp_path / "ecgen-radiology", tmp_path / "NLMCXR_png"
    reports_dir.mkdir()
    images_dir.mkdir()
    blank = Image.new("L", (16, 12))
    expected = 0
    for number in range(1, 301):  # the first 300 reports keep it fast
        path = real_reports / f"{number}.xml"
        if path.is_file():
            (reports_dir / path.name).write_bytes(path.read_bytes())
            report = read_report(path)
            expected += len(report.image_ids) if report.text else 0
            for image_id in report.image_ids:
                blank.save(images_dir / f"{image_id}.png")
    dataset = load_iu_xray(reports_dir, images_dir)
    assert len(dataset) == expected > 400
    labels = np.asarray(dataset["global_labels"])
    for finding in ("pleural effusion", "enlarged cardiac silhouette", "atelectasis", "pneumothorax"):
        assert (labels[:, DEFAULT_FINDINGS.index(finding)] != -1).any(), finding
    for finding in ("pleural effusion", "enlarged cardiac silhouette", "atelectasis", "calcified nodule"):
        assert (labels[:, DEFAULT_FINDINGS.index(finding)] == 1).any(), finding
    assert (labels[:, DEFAULT_FINDINGS.index("pneumothorax")] == 0).mean() > 0.5  # "No pneumothorax." is routine
    normal = np.array([mesh == ["normal"] for mesh in dataset["mesh"]])
    acute = [DEFAULT_FINDINGS.index(f) for f in ("pleural effusion", "pneumothorax", "consolidation",
                                                 "enlarged cardiac silhouette", "pulmonary edema/hazy opacity")]
    assert normal.sum() > 100
    assert (labels[normal][:, acute] == 1).any(axis=1).mean() < 0.05  # MeSH "normal" studies: (almost) no positives
    assert np.isnan(np.asarray(dataset["boxes"])).all()
