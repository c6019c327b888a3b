"""Chest ImaGenome indexing streams rows into the Arrow cache: same rows as `_parse_one`, bounded, only complete caches.

Runs on a few hundred synthetic scene graphs of real size written by `train.bench.index` (the benchmark's set).
"""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pytest

import train.data.common as common
import train.data.imagenome as imagenome
from modeling_anatomy_vlm import AnatomyVLMConfig
from train.bench import index as bench

DEFAULTS = AnatomyVLMConfig()
REGIONS, FINDINGS = tuple(DEFAULTS.region_names), tuple(DEFAULTS.findings)
N, DISTINCT = 300, 40
load = functools.partial(imagenome.load_imagenome, region_names=REGIONS, findings=FINDINGS)


def _split(root):
    import csv

    with open(root / "chest-imagenome/silver_dataset/splits/train.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _graph(root, dicom_id):
    return root / "chest-imagenome/silver_dataset/scene_graph" / f"{dicom_id}_SceneGraph.json"


def _direct_rows(root, entries):
    """What `_parse_one` gives for each entry, called here in-process (None for a skipped one)."""
    sizes = {r["dicom_id"]: (int(r["Rows"]), int(r["Columns"]))
             for r in imagenome.read_rows(root / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")}
    out = []
    for entry in entries:
        entry = {**entry, "split": "train"}
        job = (entry, imagenome.mimic.jpg_path_of_row(root / "mimic-cxr-jpg", entry), _graph(root, entry["dicom_id"]),
               None, sizes[entry["dicom_id"]], REGIONS, FINDINGS)
        out.append(imagenome._parse_one(job)[0])
    return out


def _caches(cache_dir):
    return sorted(p.name for p in Path(cache_dir).iterdir()) if Path(cache_dir).exists() else []


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """N synthetic graphs (DISTINCT files, the rest hard links) with one malformed graph and one missing image."""
    root, manifest = bench.write_set(tmp_path_factory.mktemp("index"), N, DISTINCT, seed=3)
    assert manifest["mean_graph_bytes"] > 20_000  # realistic size, not a toy graph
    entries = _split(root)
    malformed, missing = entries[57]["dicom_id"], entries[201]["dicom_id"]
    path = _graph(root, malformed)
    path.unlink()  # a hard link: unlink first, or every graph sharing the file would break
    path.write_text('{"objects": [{"bbox_name": "right lung", "original_x1": ')
    imagenome.mimic.jpg_path_of_row(root / "mimic-cxr-jpg", entries[201]).unlink()
    return root, entries, malformed, missing


@pytest.fixture
def small_batches(monkeypatch):
    """Arrow batches of 7 rows and worker tasks of 8 graphs, 2 ahead per worker: every bound is crossed."""
    monkeypatch.setattr(imagenome, "cached_dataset", functools.partial(common.cached_dataset, batch_size=7))
    monkeypatch.setattr(imagenome, "PARSE_CHUNK", 8)
    monkeypatch.setattr(imagenome, "CHUNKS_AHEAD", 2)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_streamed_rows_equal_parse_one(synthetic_set, tmp_path, small_batches, num_proc):
    root, entries, malformed, missing = synthetic_set
    dataset = load(root, "train", num_proc=num_proc, cache_dir=tmp_path)
    expected = [row for row in _direct_rows(root, entries) if row is not None]
    assert len(dataset) == len(expected) == N - 2
    kept_ids = [e["dicom_id"] for e in entries if e["dicom_id"] not in (malformed, missing)]
    assert dataset["image_id"] == kept_ids  # split order, the two bad rows left out
    for i in (0, 56, 57, 199, 200, len(expected) - 1):  # around the dropped rows, and the ends
        row, want = dataset[i], expected[i]
        assert row["image_id"] == want["image_id"] and row["image"]["path"] == want["image"]
        np.testing.assert_array_equal(np.asarray(row["boxes"], dtype=np.float32), want["boxes"])
        np.testing.assert_array_equal(np.asarray(row["region_labels"], dtype=np.int8), want["region_labels"])
        assert row["global_labels"] == want["global_labels"]
        assert row["region_phrases"] == want["region_phrases"]
        assert (row["width"], row["height"]) == (want["width"], want["height"])
    # the graph's own boxes (hard-linked graph k serves images k, k + DISTINCT, ...)
    graph = json.loads(_graph(root, kept_ids[100]).read_text())
    boxes = np.asarray(dataset[100]["boxes"])
    for obj in graph["objects"]:
        if obj["bbox_name"] in REGIONS:
            np.testing.assert_allclose(boxes[REGIONS.index(obj["bbox_name"])],
                                       [obj[k] for k in ("original_x1", "original_y1", "original_x2", "original_y2")])
    # the whole table is the one `Dataset.from_dict` of every row (the former, in-memory path) gives
    [cache] = [p for p in tmp_path.iterdir() if p.name.startswith("imagenome-train-")]
    stored = datasets.Features({**common.features(len(REGIONS), len(FINDINGS)), "image": datasets.Value("string")})
    whole = datasets.Dataset.from_dict({c: [r[c] for r in expected] for c in stored}, features=stored)
    on_disk = datasets.load_from_disk(str(cache))
    assert on_disk.features == stored
    assert on_disk.data.table.equals(whole.data.table)
    stats = json.loads((cache / "anatomy_vlm_stats.json").read_text())
    assert stats["counts"]["scene graph malformed"] == 1 and stats["counts"]["image missing"] == 1
    assert any(f"{malformed}_SceneGraph.json: malformed scene graph" in t
               for t in stats["examples"]["scene graph malformed"])
    assert any(f"{missing}.jpg: image file not found" in t for t in stats["examples"]["image missing"])
    assert _caches(tmp_path) == [cache.name]  # no .tmp left behind


def test_raise_policy_stops_the_stream(synthetic_set, tmp_path, small_batches):
    root, _, malformed, _ = synthetic_set
    with pytest.raises(ValueError, match=rf"{malformed}_SceneGraph.json: malformed scene graph"):
        load(root, "train", num_proc=2, on_error="raise", cache_dir=tmp_path)
    assert _caches(tmp_path) == []


def test_build_failing_midway_leaves_only_complete_caches(synthetic_set, tmp_path, small_batches, monkeypatch):
    root, *_ = synthetic_set
    first = load(root, "train", cache_dir=tmp_path)
    [complete] = _caches(tmp_path)
    parse, calls = imagenome._parse_one, []

    def failing(job):
        calls.append(job)
        if len(calls) == 150:
            raise RuntimeError("disk went away")
        return parse(job)

    monkeypatch.setattr(imagenome, "_parse_one", failing)
    with pytest.raises(RuntimeError, match="disk went away"):  # a rebuild that fails halfway through
        load(root, "train", cache_dir=tmp_path, overwrite_cache=True)
    assert _caches(tmp_path) == [complete]  # the earlier, complete cache is kept, the partial one removed
    monkeypatch.setattr(imagenome, "_parse_one", lambda job: pytest.fail("parsed again"))
    assert load(root, "train", cache_dir=tmp_path)["image_id"] == first["image_id"]
    other = tmp_path / "fresh"
    calls.clear()
    monkeypatch.setattr(imagenome, "_parse_one", failing)
    with pytest.raises(RuntimeError, match="disk went away"):
        load(root, "train", cache_dir=other)
    assert _caches(other) == []


def test_killed_build_leaves_no_final_cache(synthetic_set, tmp_path):
    """A build killed (SIGKILL) midway leaves only `.tmp`; the next build replaces it with a complete cache."""
    root, *_ = synthetic_set
    marker = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        import train.data.imagenome as m
        from modeling_anatomy_vlm import AnatomyVLMConfig
        parse, seen = m._parse_one, []
        def slow(job):
            seen.append(1)
            if len(seen) == 100:
                open({str(marker)!r}, "w").close()
            if len(seen) >= 100:
                time.sleep(60)
            return parse(job)
        m._parse_one = slow
        c = AnatomyVLMConfig()
        m.load_imagenome({str(root)!r}, "train", region_names=c.region_names, findings=c.findings,
                         cache_dir={str(tmp_path / "cache")!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, "the indexing child ended before it was killed"
            assert time.time() < deadline, "the indexing child never reached row 100"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    left = _caches(tmp_path / "cache")
    assert len(left) == 1 and left[0].endswith(".tmp")  # only the unfinished folder, never the final name
    dataset = load(root, "train", cache_dir=tmp_path / "cache")
    assert len(dataset) == N - 2
    assert _caches(tmp_path / "cache") == [left[0][: -len(".tmp")]]


def test_ordered_map_keeps_a_bounded_window(monkeypatch):
    """Results come in job order, and only CHUNKS_AHEAD tasks per worker run ahead of the consumer."""
    monkeypatch.setattr(imagenome, "_parse_one", lambda job: job * 10)
    monkeypatch.setattr(imagenome, "PARSE_CHUNK", 5)
    monkeypatch.setattr(imagenome, "CHUNKS_AHEAD", 3)
    pulled = []

    def jobs():
        for i in range(1000):
            pulled.append(i)
            yield i

    with ThreadPoolExecutor(2) as pool:
        results = imagenome._ordered_map(pool, jobs(), 2)
        got = []
        for value in results:
            got.append(value)
            consumed_tasks = -(-len(got) // 5)
            assert len(pulled) <= (consumed_tasks + 2 * 3) * 5  # never more than 6 tasks ahead
    assert got == [10 * i for i in range(1000)]


def test_list_builds_still_work_and_empty_is_an_error(tmp_path):
    feats = datasets.Features({"image": datasets.Image(decode=False), "x": datasets.Value("int32")})
    rows = [{"image": f"/img/{i}.png", "x": i} for i in range(5)]
    problems = common.DataProblems("t")
    dataset = common.cached_dataset("t", {"k": 1}, lambda: (rows, problems), feats, cache_dir=tmp_path, batch_size=2)
    assert dataset["x"] == list(range(5)) and dataset[0]["image"] == {"bytes": None, "path": "/img/0.png"}
    with pytest.raises(ValueError, match="no usable images"):
        common.cached_dataset("t", {"k": 2}, lambda: (iter(()), common.DataProblems("t")), feats, cache_dir=tmp_path)
    assert len(_caches(tmp_path)) == 1 and not _caches(tmp_path)[0].endswith(".tmp")  # the empty build left nothing


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    report = bench.main(["--n", "400", "--distinct", "30", "--num-proc", "2", "--workdir", str(tmp_path),
                         "--sample-s", "0.1", "--json", str(tmp_path / "index.json")])
    assert report["rows"] == 400 and report["graphs_per_s"] > 0
    assert 0 < report["peak_rss_worker_gb"] and 0 < report["peak_rss_main_gb"] <= report["peak_rss_max_process_gb"]
    assert json.loads((tmp_path / "index.json").read_text()) == report
    assert not (tmp_path / "cache").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("index: 400 scene graphs (") and "graphs/s); peak RSS" in last
