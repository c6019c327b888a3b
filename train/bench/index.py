"""Chest ImaGenome indexing at MIMIC scale: time and peak memory of `load_imagenome` on N synthetic scene graphs.

    python -m train.bench.index                                   # 240,000 scene graphs, 2 worker processes
    python -m train.bench.index --n 2000 --distinct 200 --json /tmp/index.json

Writes N synthetic Chest ImaGenome scene graphs of realistic size in the real layout under ``--workdir``::

    chest-imagenome/silver_dataset/scene_graph/{dicom_id}_SceneGraph.json
    chest-imagenome/silver_dataset/splits/train.csv          (subject_id, study_id, dicom_id, path)
    mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv               (Rows / Columns of every image: no JPEG header is read)
    mimic-cxr-jpg/files/p{..}/p{subject}/s{study}/{dicom_id}.jpg

Each graph has the fields of a real one: 36 objects (the model's 29 regions and Chest ImaGenome's 7 others, with
object_id, x1..y2, width, height, original_x1..original_y2, original_width, original_height, bbox_name, synsets,
name), 10-20 ``attributes`` entries (phrases with "category|yes|label" strings of real finding labels,
attributes_ids, phrase_IDs, sections, comparison / temporal / severity / texture cues, ...), 50-100
``relationships`` (comparisons with a prior study) and the image-level fields (image_id, viewpoint, patient_id,
study_id, gender, age_decile, reason_for_exam, StudyOrder, StudyDateTime). Only ``--distinct`` graphs are written;
the other dicom ids are hard links to them (so graph k's boxes serve images k, k + distinct, ...; the metadata
table gives those images the size graph k was drawn for). Every JPEG is a hard link to a small placeholder (a copy
per 50,000 links: ext4 allows 65,000): the loader only checks that the file exists. A set already written with the
same (n, distinct, seed) is reused.

Then `load_imagenome(root, "train", num_proc=..., overwrite_cache=True)` runs in a child process (a fresh Arrow
cache under the work folder, deleted afterwards unless ``--keep-cache``) while this process samples the memory of
the child and its worker processes with psutil every ``--sample-s`` seconds. Memory figures:

  main          peak RSS of the process that runs `load_imagenome` (``getrusage(RUSAGE_SELF).ru_maxrss``, exact);
  worker        the largest peak RSS of its worker processes (``getrusage(RUSAGE_CHILDREN)``, exact). Workers are
                forked from main, so their RSS counts the pages they share with it (torch, transformers: ~0.7 GB);
  all (RSS)     the largest sum of RSS over main + workers seen by the sampler (counts shared pages twice or more);
  all (PSS)     the largest sum of PSS (shared pages split between the processes sharing them) seen by the
                sampler: the memory the indexing really takes from the machine.

The last line is the summary; ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from modeling_anatomy_vlm.configuration_anatomy_vlm import AnatomyVLMConfig
from train.data.mimic import METADATA_CSV, study_path
from train.data.phantom.ids import make_ids
from train.data.phantom.layout import METADATA_COLUMNS
from train.data.phantom.report import _object_name
from train.text.vocabulary import FINDING_CATEGORY, IMAGENOME_VOCABULARY, REGIONS, format_attribute

SET_VERSION = "bench-index-1"
LINKS_PER_FILE = 50_000
TARGET_GB = 4.0

# Chest ImaGenome's 36 boxes: the model's 29 regions plus these 7. Fractions (x1, y1, x2, y2) of the image; the
# patient's right is on the image's left.
OTHER_BOXES = ("right cardiophrenic angle", "left cardiophrenic angle", "right cardiac silhouette",
               "left cardiac silhouette", "descending aorta", "right upper abdomen", "left upper abdomen")
LAYOUT = {
    "right lung": (0.14, 0.14, 0.48, 0.78), "left lung": (0.52, 0.14, 0.86, 0.80),
    "right upper lung zone": (0.16, 0.16, 0.47, 0.36), "left upper lung zone": (0.53, 0.16, 0.84, 0.36),
    "right mid lung zone": (0.15, 0.36, 0.47, 0.56), "left mid lung zone": (0.53, 0.36, 0.85, 0.56),
    "right lower lung zone": (0.14, 0.56, 0.47, 0.78), "left lower lung zone": (0.53, 0.56, 0.86, 0.80),
    "right hilar structures": (0.33, 0.36, 0.46, 0.52), "left hilar structures": (0.54, 0.36, 0.67, 0.52),
    "right apical zone": (0.18, 0.12, 0.44, 0.24), "left apical zone": (0.56, 0.12, 0.82, 0.24),
    "right costophrenic angle": (0.12, 0.70, 0.24, 0.82), "left costophrenic angle": (0.76, 0.72, 0.88, 0.84),
    "right hemidiaphragm": (0.14, 0.68, 0.48, 0.80), "left hemidiaphragm": (0.52, 0.70, 0.86, 0.82),
    "trachea": (0.46, 0.04, 0.54, 0.34), "spine": (0.44, 0.02, 0.56, 0.98),
    "right clavicle": (0.12, 0.12, 0.46, 0.22), "left clavicle": (0.54, 0.12, 0.88, 0.22),
    "aortic arch": (0.50, 0.26, 0.62, 0.36), "mediastinum": (0.38, 0.20, 0.64, 0.78),
    "upper mediastinum": (0.40, 0.20, 0.60, 0.38), "svc": (0.40, 0.24, 0.48, 0.42),
    "cardiac silhouette": (0.36, 0.44, 0.72, 0.78), "cavoatrial junction": (0.40, 0.42, 0.48, 0.50),
    "right atrium": (0.36, 0.46, 0.50, 0.70), "carina": (0.46, 0.32, 0.54, 0.40),
    "abdomen": (0.10, 0.80, 0.90, 1.00),
    "right cardiophrenic angle": (0.34, 0.68, 0.44, 0.78), "left cardiophrenic angle": (0.62, 0.70, 0.74, 0.80),
    "right cardiac silhouette": (0.36, 0.44, 0.50, 0.78), "left cardiac silhouette": (0.50, 0.44, 0.72, 0.78),
    "descending aorta": (0.52, 0.30, 0.60, 0.76), "right upper abdomen": (0.10, 0.80, 0.50, 1.00),
    "left upper abdomen": (0.50, 0.82, 0.90, 1.00),
}
SECTIONS = ("finalreport", "impression", "history", "comparison")
SEVERITY = ("mild", "moderate", "severe", "small", "large", "minimal")
TEXTURE = ("patchy", "streaky", "hazy", "nodular", "linear", "reticular")
TEMPORAL = ("new", "increased", "decreased", "unchanged", "improved", "worsened", "resolved")
COMPARISON = ("improved", "worsened", "no change")
REASONS = ("___F with shortness of breath // eval for pneumonia", "___M with cough, fever // r/o infiltrate",
           "Chest pain, evaluate for acute process", "Dyspnea, history of CHF // pulmonary edema?",
           "Preoperative chest radiograph", "s/p line placement // line position?")
TEMPLATES = (
    "There is a {sev} {label} in the {region}.",
    "{Sev} {label} is seen in the {region}, {temp} compared to the prior radiograph.",
    "No {label} is seen in the {region}.",
    "The {region} demonstrates {tex} {label}, which may reflect atelectasis though infection is not excluded.",
    "Compared to the prior study there is {temp} {label} at the {region}.",
    "Findings in the {region} are consistent with {label}; clinical correlation is recommended.",
)


def _label_pool(bbox_name: str) -> list[str]:
    """Labels a phrase about `bbox_name` may carry: the region's plausible findings, else a generic pool."""
    found = list(REGIONS[bbox_name].findings) if bbox_name in REGIONS else []
    return found or ["lung opacity", "atelectasis", "pleural effusion", "enlarged cardiac silhouette"]


def _category(label: str) -> str:
    if label in FINDING_CATEGORY:
        return FINDING_CATEGORY[label]
    return next(c for c, labels in IMAGENOME_VOCABULARY.items() if label in labels)


def _cui(rng) -> str:
    return f"C{int(rng.integers(0, 10**7)):07d}"


def synthetic_scene_graph(rng: np.random.Generator, dicom_id: str, subject_id: int, study_id: int, width: int,
                          height: int) -> dict:
    """One scene graph with the fields, shapes and sizes of a real Chest ImaGenome silver graph."""
    scale = 224.0 / max(width, height)
    pad_x, pad_y = (224.0 - width * scale) / 2, (224.0 - height * scale) / 2
    shift = rng.normal(0, 0.012, size=2)
    objects = []
    names = list(AnatomyVLMConfig().region_names) + list(OTHER_BOXES)
    for name in names:
        fx1, fy1, fx2, fy2 = (np.asarray(LAYOUT[name]) + np.tile(shift, 2) + rng.normal(0, 0.008, size=4))
        x1, x2 = sorted((int(np.clip(fx1, 0, 1) * width), int(np.clip(fx2, 0, 1) * width)))
        y1, y2 = sorted((int(np.clip(fy1, 0, 1) * height), int(np.clip(fy2, 0, 1) * height)))
        x2, y2 = max(x2, x1 + 8), max(y2, y1 + 8)
        sx1, sy1 = int(round(x1 * scale + pad_x)), int(round(y1 * scale + pad_y))
        sx2, sy2 = int(round(x2 * scale + pad_x)), int(round(y2 * scale + pad_y))
        objects.append({
            "object_id": f"{dicom_id}_{name}", "x1": sx1, "y1": sy1, "x2": sx2, "y2": sy2,
            "width": sx2 - sx1, "height": sy2 - sy1, "bbox_name": name, "synsets": [_cui(rng)],
            "name": _object_name(name), "original_x1": x1, "original_y1": y1, "original_x2": x2, "original_y2": y2,
            "original_width": x2 - x1, "original_height": y2 - y1,
        })
    attributes = []
    phrase_no = 0
    for name in rng.choice(names, size=int(rng.integers(10, 21)), replace=False):
        name = str(name)
        entry = {name: True, "bbox_name": name, "synsets": [_cui(rng)], "name": _object_name(name), "attributes": [],
                 "attributes_ids": [], "phrases": [], "phrase_IDs": [], "sections": [], "comparison_cues": [],
                 "temporal_cues": [], "severity_cues": [], "texture_cues": [], "object_id": f"{dicom_id}_{name}"}
        pool = _label_pool(name)
        for _ in range(int(rng.integers(1, 3))):
            labels = [str(x) for x in rng.choice(pool, size=min(len(pool), int(rng.integers(1, 4))), replace=False)]
            present = bool(rng.random() < 0.4)
            strings = [format_attribute(label, present, _category(label)) for label in labels]
            strings.append(f"nlp|yes|{'abnormal' if present else 'normal'}")
            sev, tex, temp = (str(rng.choice(SEVERITY)), str(rng.choice(TEXTURE)), str(rng.choice(TEMPORAL)))
            template = TEMPLATES[2] if not present else str(rng.choice(TEMPLATES))
            phrase = template.format(sev=sev, Sev=sev.capitalize(), label=" and ".join(labels), region=name,
                                     tex=tex, temp=temp)
            entry["phrases"].append(phrase)
            entry["attributes"].append(strings)
            entry["attributes_ids"].append([f"{_cui(rng)};;{_cui(rng)}" if i % 2 else _cui(rng)
                                            for i in range(len(strings))])
            entry["phrase_IDs"].append(f"{study_id}|{phrase_no}")
            entry["sections"].append(str(rng.choice(SECTIONS[:2])))
            entry["comparison_cues"].append([f"comparison|yes|{rng.choice(COMPARISON)}"] if rng.random() < 0.3 else [])
            entry["temporal_cues"].append([temp] if "{temp}" in template else [])
            entry["severity_cues"].append([sev] if "{sev}" in template.lower() else [])
            entry["texture_cues"].append([tex] if "{tex}" in template else [])
            phrase_no += 1
        attributes.append(entry)
    prior = "-".join(f"{int(x):08x}" for x in rng.integers(0, 16**8, size=5))  # the prior study's dicom_id
    relationships = []
    for k in range(int(rng.integers(50, 101))):
        name = str(rng.choice(names))
        cue = str(rng.choice(COMPARISON))
        relationships.append({
            "relationship_id": f"{study_id}|{k}",
            "predicate": f'["comparison|yes|{cue}"]',
            "synsets": [_cui(rng)],
            "bbox_name": name,
            "subject_id": f"{dicom_id}_{name}",
            "object_id": f"{prior}_{name}",
        })
    return {
        "image_id": dicom_id,
        "viewpoint": str(rng.choice(("PA", "AP"))),
        "patient_id": int(subject_id),
        "study_id": int(study_id),
        "gender": str(rng.choice(("F", "M"))),
        "age_decile": str(rng.choice(("20-30", "30-40", "40-50", "50-60", "60-70", "70-80", "80-90"))),
        "reason_for_exam": str(rng.choice(REASONS)),
        "StudyOrder": int(rng.integers(1, 12)),
        "StudyDateTime": f"21{int(rng.integers(10, 99))}-0{int(rng.integers(1, 10))}-1{int(rng.integers(0, 10))} "
                         f"1{int(rng.integers(0, 10))}:2{int(rng.integers(0, 10))}:00 UTC",
        "objects": objects,
        "attributes": attributes,
        "relationships": relationships,
    }


def write_set(workdir: Path, n: int, distinct: int, seed: int = 0) -> tuple[Path, dict]:
    """Write (or reuse) the synthetic set; returns (root, manifest)."""
    root = Path(workdir) / f"imagenome-n{n}-d{distinct}-s{seed}"
    manifest_path = root / "bench_manifest.json"
    wanted = {"version": SET_VERSION, "n": n, "distinct": distinct, "seed": seed}
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("complete") and all(manifest.get(k) == v for k, v in wanted.items()):
            print(f"index: reusing the synthetic set in {root}")
            return root, manifest
    except (OSError, ValueError):
        pass
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    silver = root / "chest-imagenome" / "silver_dataset"
    graphs_dir, splits_dir, mimic_dir = silver / "scene_graph", silver / "splits", root / "mimic-cxr-jpg"
    for folder in (graphs_dir, splits_dir, mimic_dir / "files"):
        folder.mkdir(parents=True)
    from PIL import Image

    placeholder = root / "placeholder.jpg"
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buffer, "JPEG")
    placeholder.write_bytes(buffer.getvalue())

    distinct = max(1, min(distinct, n))
    sizes, graph_bytes = [], []
    made_dirs: set[str] = set()
    with open(splits_dir / "train.csv", "w", newline="") as split_file, \
            open(mimic_dir / METADATA_CSV, "w", newline="") as meta_file:
        split_csv, meta_csv = csv.writer(split_file), csv.writer(meta_file)
        split_csv.writerow(("subject_id", "study_id", "dicom_id", "path"))
        meta_csv.writerow(METADATA_COLUMNS)
        for i in range(n):
            subject_id, study_id, dicom_id = make_ids(seed, i)
            graph_path = graphs_dir / f"{dicom_id}_SceneGraph.json"
            if i < distinct:
                rng = np.random.default_rng([seed, i])
                height, width = int(rng.integers(2400, 3100)), int(rng.integers(2300, 3100))
                text = json.dumps(synthetic_scene_graph(rng, dicom_id, subject_id, study_id, width, height))
                graph_path.write_text(text)
                sizes.append((height, width, graph_path))
                graph_bytes.append(len(text))
            else:
                height, width, source = sizes[i % distinct]
                os.link(source, graph_path)
            study = study_path(subject_id, study_id)
            folder = mimic_dir / study
            if study not in made_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                made_dirs.add(study)
            if i % LINKS_PER_FILE == 0 and i:  # ext4 allows 65,000 links to a file: start another copy
                placeholder = root / f"placeholder-{i // LINKS_PER_FILE}.jpg"
                placeholder.write_bytes(buffer.getvalue())
            os.link(placeholder, folder / f"{dicom_id}.jpg")
            split_csv.writerow((subject_id, study_id, dicom_id, f"{study}/{dicom_id}.dcm"))
            meta_csv.writerow((dicom_id, subject_id, study_id, "CHEST (PA AND LAT)", "PA", height, width,
                               21500101, "120000.000", "CHEST (PA AND LAT)", "postero-anterior", "Erect"))
    manifest = {**wanted, "complete": True, "mean_graph_bytes": float(np.mean(graph_bytes)),
                "min_graph_bytes": int(min(graph_bytes)), "max_graph_bytes": int(max(graph_bytes)),
                "write_s": round(time.perf_counter() - start, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    print(f"index: wrote {n:,} scene graphs in {manifest['write_s']} s under {root}: {distinct:,} distinct JSON "
          f"files ({manifest['mean_graph_bytes'] / 1e3:.1f} KB mean, {manifest['min_graph_bytes'] / 1e3:.1f}-"
          f"{manifest['max_graph_bytes'] / 1e3:.1f} KB), the other {n - distinct:,} hard links to them; every JPEG "
          f"a hard link to one of {-(-n // LINKS_PER_FILE)} {placeholder.stat().st_size}-byte placeholders")
    return root, manifest


def _child_load(spec: dict) -> None:
    """Runs in the child: index the set, then write the figures (JSON) to spec['out']."""
    import logging

    from train.data.imagenome import load_imagenome

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = AnatomyVLMConfig()
    start = time.perf_counter()
    dataset = load_imagenome(spec["root"], "train", region_names=config.region_names, findings=config.findings,
                             num_proc=spec["num_proc"], cache_dir=spec["cache_dir"], overwrite_cache=True)
    seconds = time.perf_counter() - start
    cache = Path(dataset.cache_files[0]["filename"]).parent
    stats = json.loads((cache / "anatomy_vlm_stats.json").read_text())
    Path(spec["out"]).write_text(json.dumps({
        "rows": len(dataset), "seconds": seconds,
        "main_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "worker_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "arrow_bytes": sum(f.stat().st_size for f in cache.iterdir()), "problems": stats["counts"],
    }))


class _Sampler(threading.Thread):
    """Samples RSS and PSS of a process and its descendants; keeps the largest sums and per-process peaks."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.max_rss_sum = self.max_pss_sum = 0
        self.max_processes = 0
        self.samples = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            rss = pss = count = 0
            try:
                processes = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for process in processes:
                try:
                    info = process.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss, count = rss + info.rss, pss + getattr(info, "pss", info.rss), count + 1
            self.max_rss_sum, self.max_pss_sum = max(self.max_rss_sum, rss), max(self.max_pss_sum, pss)
            self.max_processes = max(self.max_processes, count)
            self.samples += 1
            self.stop.wait(self.interval)


def measure_load(root: Path, num_proc: int, cache_dir: Path, sample_s: float = 0.5) -> dict:
    """`load_imagenome` of the set in a child process; its time and memory (module docstring)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / "child.json"
    spec = {"root": str(root), "num_proc": num_proc, "cache_dir": str(cache_dir / "datasets"), "out": str(out)}
    child = subprocess.Popen([sys.executable, "-m", "train.bench.index", "--child", json.dumps(spec)])
    sampler = _Sampler(child.pid, sample_s)
    sampler.start()
    rc = child.wait()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise RuntimeError(f"the indexing child process failed (exit status {rc})")
    result = json.loads(out.read_text())
    result.update(max_rss_sum_bytes=sampler.max_rss_sum, max_pss_sum_bytes=sampler.max_pss_sum,
                  max_processes=sampler.max_processes, samples=sampler.samples,
                  tree_peak_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return result


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=240_000, help="scene graphs in the split")
    parser.add_argument("--num-proc", type=int, default=2, help="worker processes of load_imagenome")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct JSON files (the rest are hard links)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench_index"))
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval (seconds)")
    parser.add_argument("--keep-cache", action="store_true", help="keep the Arrow cache the load wrote")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_load(json.loads(args.child))
        return {}

    root, manifest = write_set(args.workdir, args.n, args.distinct, args.seed)
    cache_dir = args.workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    load_before = loadavg()
    try:
        result = measure_load(root, args.num_proc, cache_dir, args.sample_s)
    finally:
        if not args.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    load_after = loadavg()
    gb = 1024 / 1e9  # kB -> GB
    report = {
        "n": args.n, "distinct": manifest["distinct"], "num_proc": args.num_proc, "rows": result["rows"],
        "mean_graph_kb": round(manifest["mean_graph_bytes"] / 1e3, 1), "seconds": round(result["seconds"], 1),
        "graphs_per_s": round(args.n / result["seconds"], 1),
        "peak_rss_main_gb": round(result["main_peak_kb"] * gb, 3),
        "peak_rss_worker_gb": round(result["worker_peak_kb"] * gb, 3),
        "peak_rss_max_process_gb": round(result["tree_peak_kb"] * gb, 3),
        "peak_rss_sum_sampled_gb": round(result["max_rss_sum_bytes"] / 1e9, 3),
        "peak_pss_sum_sampled_gb": round(result["max_pss_sum_bytes"] / 1e9, 3),
        "processes_seen": result["max_processes"], "memory_samples": result["samples"],
        "arrow_gb": round(result["arrow_bytes"] / 1e9, 3), "problems": result["problems"],
        "loadavg_before": load_before, "loadavg_after": load_after, "target_gb": TARGET_GB,
    }
    print(f"index: arrow cache {report['arrow_gb']:.2f} GB; problems {report['problems']}; load average "
          f"{load_before} before, {load_after} after; {report['memory_samples']} memory samples of up to "
          f"{report['processes_seen']} processes")
    print(f"index: {args.n:,} scene graphs ({report['mean_graph_kb']:.0f} KB each) in {report['seconds']:.0f} s with "
          f"{args.num_proc} processes ({report['graphs_per_s']:.0f} graphs/s); peak RSS "
          f"{report['peak_rss_main_gb']:.2f} GB main, {report['peak_rss_worker_gb']:.2f} GB per worker, "
          f"all processes together {report['peak_rss_sum_sampled_gb']:.2f} GB RSS / "
          f"{report['peak_pss_sum_sampled_gb']:.2f} GB PSS (sampled) (target <= {TARGET_GB:g} GB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
