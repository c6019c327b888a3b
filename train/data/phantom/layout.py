"""Writing a phantom set in the native layouts: MIMIC-CXR-JPG, MIMIC-CXR reports, Chest ImaGenome, CheXmask.

    DIR/mimic-cxr-jpg/files/p{first 2 digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg
    DIR/mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv
    DIR/mimic-cxr-reports/files/p{first 2 digits}/p{subject_id}/s{study_id}.txt
    DIR/chest-imagenome/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json
    DIR/chest-imagenome/silver_dataset/splits/{train,valid,test,images_to_avoid}.csv
    DIR/chexmask/MIMIC-CXR-JPG.csv
    DIR/phantom/masks/{dicom_id}.npz (`train.data.phantom.masks`), DIR/phantom/manifest.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_anatomy_vlm.configuration_anatomy_vlm import ANATOMICAL_REGIONS
from train.data.mimic import CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV, study_path
from train.data.phantom.findings import DRAWN_FINDINGS
from train.data.phantom.ids import avoided, make_ids
from train.data.phantom.masks import save_masks
from train.data.phantom.render import RENDER_FACTOR, render_phantom
from train.data.phantom.report import CHEXPERT_COLUMNS
from train.data.rle import chexmask_rle_encode as rle_encode

GENERATOR_VERSION = "phantom-1.1"
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
CHEXMASK_COLUMNS = (
    "dicom_id", "Dice RCA (Max)", "Dice RCA (Mean)", "Landmarks", "Left Lung", "Right Lung", "Heart",
    "Height", "Width",
)


def _rel_paths(subject_id: int, study_id: int, dicom_id: str) -> dict[str, str]:
    study = study_path(subject_id, study_id)
    return {
        "jpg": f"mimic-cxr-jpg/{study}/{dicom_id}.jpg",
        "report": f"mimic-cxr-reports/{study}.txt",
        "scene_graph": f"chest-imagenome/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json",
        "masks": f"phantom/masks/{dicom_id}.npz",
        "dcm": f"{study}/{dicom_id}.dcm",  # the MIMIC-CXR DICOM path Chest ImaGenome's split tables give
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
        "split": ph.split, "avoid": ph.split == "test" and avoided(seed, index), "height": ph.height,
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
        f"mimic-cxr-jpg/{METADATA_CSV}", f"mimic-cxr-jpg/{SPLIT_CSV}",
        f"mimic-cxr-jpg/{CHEXPERT_CSV}", "chexmask/MIMIC-CXR-JPG.csv",
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
    manifest.update({"complete": True, "splits": counts, "findings": list(DRAWN_FINDINGS),
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

    write(f"mimic-cxr-jpg/{METADATA_CSV}", METADATA_COLUMNS, [
        (r["dicom_id"], r["subject_id"], r["study_id"], "CHEST (PA AND LAT)", "PA", r["height"], r["width"],
         r["date"], r["time"], "CHEST (PA AND LAT)", "postero-anterior", "Erect") for r in rows])
    write(f"mimic-cxr-jpg/{SPLIT_CSV}", ("dicom_id", "study_id", "subject_id", "split"),
          [(r["dicom_id"], r["study_id"], r["subject_id"], r["split"]) for r in rows])
    write(f"mimic-cxr-jpg/{CHEXPERT_CSV}", ("subject_id", "study_id") + CHEXPERT_COLUMNS,
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
    parser = argparse.ArgumentParser(prog="python -m train.data.phantom",
                                     description="Generate a procedural phantom chest X-ray data set.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, required=True, help="number of images (one per study)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="long side of each image in pixels")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0 = all cores)")
    args = parser.parse_args(argv)
    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    path = generate_dataset(args.out, args.n, args.seed, args.size, workers)
    print(f"phantom data set in {path}")

