"""The prepared image store (train.data.prepare): resumable, deterministic, and faithful to the processor's resize."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_anatomy_vlm.image_processing_anatomy_vlm import AnatomyVLMImageProcessor, load_grayscale
from train.data import prepare as prep
from train.data.prepare import PreparedImages

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
SHAPES = [(300, 360), (257, 200), (360, 300), (200, 257)] * 3  # (height, width) of the 12 JPEGs
SMALL_SHAPE = (96, 80)  # below SIZE: stored at its own size, never upscaled
PNG_SHAPE = (240, 200)


def radiograph(shape, seed: int) -> np.ndarray:
    """uint8 chest-like structure: a vertical gradient, two dark 'lungs', a bright 'heart', mild grain."""
    height, width = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 210 - 80 * yy / height + 10 * np.sin(xx / (7 + seed))
    for cx in (0.3 * width, 0.7 * width):
        lung = ((xx - cx) / (0.17 * width)) ** 2 + ((yy - 0.45 * height) / (0.3 * height)) ** 2 < 1
        image = np.where(lung, 55 + 40 * yy / height, image)
    heart = ((xx - 0.55 * width) / (0.12 * width)) ** 2 + ((yy - 0.6 * height) / (0.12 * height)) ** 2 < 1
    image = np.where(heart, 190, image) + rng.normal(0, 3, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def _mimic_path(root: Path, i: int, suffix: str = ".jpg") -> Path:
    subject = 10000000 + 17 * i
    path = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{50000000 + i}" / f"{i:08x}-dicom{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A MIMIC-CXR-JPG-like tree: 12 JPEGs (two sizes, both orientations), a small JPEG, a PNG, a corrupt JPEG
    (the first half of a real one) and two files that are not sources."""
    root = tmp_path_factory.mktemp("src") / "mimic-cxr-jpg"
    good: dict[str, tuple[int, int]] = {}
    for i, shape in enumerate(SHAPES):
        path = _mimic_path(root, i)
        Image.fromarray(radiograph(shape, i), "L").save(path, "JPEG", quality=95)
        good[path.relative_to(root).as_posix()] = shape
    small = _mimic_path(root, 20)
    Image.fromarray(radiograph(SMALL_SHAPE, 20), "L").save(small, "JPEG", quality=95)
    good[small.relative_to(root).as_posix()] = SMALL_SHAPE
    png = _mimic_path(root, 21, ".png")
    Image.fromarray(radiograph(PNG_SHAPE, 21), "L").save(png)
    good[png.relative_to(root).as_posix()] = PNG_SHAPE
    corrupt = _mimic_path(root, 22)
    whole = _mimic_path(root, 0).read_bytes()
    corrupt.write_bytes(whole[: len(whole) // 2])
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,Rows,Columns\n")
    (_mimic_path(root, 0).parent / "notes.txt").write_text("not an image")
    return {"root": root, "good": good, "corrupt": corrupt.relative_to(root).as_posix(), "count": len(good) + 1}


@pytest.fixture(scope="module")
def store(source, tmp_path_factory) -> Path:
    """An uninterrupted draft-mode store of `source` (shard size 2: 8 shards)."""
    out = tmp_path_factory.mktemp("store") / "prepared"
    prep.main([str(source["root"]), "--out", str(out), "--size", str(SIZE), "--shard-size", "2", "--num-proc", "1"])
    return out


def _store_bytes(folder: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("shard-") or p.name == "manifest.jsonl")
    return {name: (folder / name).read_bytes() for name in names}


def test_killed_prepare_resumes_to_the_same_bytes(source, store, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, prep.DELAY_ENV: "0.6"}  # each shard waits 0.6 s: 8 shards take about 5 s after startup
    command = [sys.executable, "-m", "train.data.prepare", str(source["root"]), "--out", str(out), "--size",
               str(SIZE), "--shard-size", "2", "--num-proc", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.json"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no shard committed within 120 s"
            time.sleep(0.02)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    committed = len(list(out.glob("shard-*.json")))
    assert 2 <= committed < 8 and not (out / "prepared.json").exists() and not (out / "manifest.jsonl").exists()
    (out / "shard-00007.u8.partial").write_bytes(b"left by a killed run")  # stray, uncommitted

    summary = prep.main([str(source["root"]), "--out", str(out), "--size", str(SIZE), "--shard-size", "2",
                         "--num-proc", "1"])
    assert summary["prepared_now"] == source["count"] - 2 * committed  # committed shards were not decoded again
    assert not list(out.glob("*.partial"))
    resumed, fresh = _store_bytes(out), _store_bytes(store)
    assert sorted(resumed) == sorted(fresh) and len(fresh) == 2 * 8 + 1
    for name in fresh:
        assert resumed[name] == fresh[name], name
    assert json.loads((out / "prepared.json").read_text()) == json.loads((store / "prepared.json").read_text())


def test_manifest_lists_every_source_and_the_corrupt_file(source, store):
    lines = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    assert [e["path"] for e in lines] == sorted([*source["good"], source["corrupt"]])  # plan order, no .txt/.csv
    assert [e["shard"] for e in lines] == [i // 2 for i in range(len(lines))]
    bad = [e for e in lines if "error" in e]
    assert [e["path"] for e in bad] == [source["corrupt"]]
    corrupt_file = str(source["root"] / source["corrupt"])
    assert corrupt_file in bad[0]["error"] and "truncated" in bad[0]["error"]
    assert (store / "bad_files.txt").read_text() == f"{source['corrupt']}\t{bad[0]['error']}\n"
    good = {e["path"]: e for e in lines if "error" not in e}
    assert set(good) == set(source["good"])
    for rel, entry in good.items():
        data = (source["root"] / rel).read_bytes()
        assert entry["source_bytes"] == len(data) and len(entry["source_blake2b"]) == 32
    info = json.loads((store / "prepared.json").read_text())
    assert info == {"format": 1, "size": SIZE, "draft": True, "images": len(source["good"]), "bad": 1, "shards": 8,
                    "source_root": str(source["root"].resolve())}
    record = json.loads((store / "shard-00000.json").read_text())
    assert record["u8_sha256"] == hashlib.sha256((store / "shard-00000.u8").read_bytes()).hexdigest()


def _reference_uint8(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The processor's own resize of the full-size decode, as float uint8 levels (not rounded)."""
    processor = AnatomyVLMImageProcessor(size=SIZE, num_channels=1)
    height, width = processor.resized_size(*shape)
    pixels = processor(str(path))["pixel_values"][0, 0].numpy()
    return (pixels[:height, :width] * processor.image_std + processor.image_mean) * 255.0


def test_stored_pixels_match_the_processor_resize(source, store, tmp_path):
    """Against the processor's own resize of the full-size decode, in uint8 levels per image:
    * --no-draft: every pixel is the processor's value rounded (|diff| <= 0.5 level, so <= 1 level after rounding);
    * draft mode (the default): mean |diff| <= 1.25, 99th percentile <= 16, max <= 24 levels. The test images have
      aliased hard edges (binary ellipses), the worst case for DCT-domain scaling, whose per-block filter differs
      from the bilinear one there; blurred copies of them stay within ~3.5 levels. Without the draft geometry
      correction (a 257 px side decodes to 129 px for 128.5 px of image) the 200 x 257 image gives 1.31 / 20 / 51;
    * images at or below --size are stored unscaled, exactly as decoded."""
    full_out = tmp_path / "full"
    prep.main([str(source["root"]), "--out", str(full_out), "--size", str(SIZE), "--shard-size", "5",
               "--num-proc", "2", "--no-draft"])  # 3 shards in 2 worker processes
    draft, full = PreparedImages.open(store), PreparedImages.open(full_out)
    assert len(draft) == len(full) == len(source["good"]) and draft.size == SIZE
    assert draft.source_root == source["root"].resolve()
    processor = AnatomyVLMImageProcessor(size=SIZE)
    draft_errors = []
    for rel, shape in source["good"].items():
        path = source["root"] / rel
        (d_pixels, d_size), (f_pixels, f_size) = draft.get(path), full.get(str(path))
        assert d_size == f_size == shape
        assert d_pixels.dtype == np.uint8 and f_pixels.dtype == np.uint8
        if max(shape) <= SIZE:  # never upscaled
            exact = np.rint(load_grayscale(str(path)) * 255).astype(np.uint8)
            np.testing.assert_array_equal(d_pixels, exact)
            np.testing.assert_array_equal(f_pixels, exact)
            continue
        assert d_pixels.shape == f_pixels.shape == processor.resized_size(*shape)
        reference = _reference_uint8(path, shape)
        assert np.abs(f_pixels - reference).max() <= 0.5 + 1e-3, rel
        diff = np.abs(d_pixels.astype(np.float64) - reference)
        draft_errors.append((diff.mean(), diff.max()))
        assert diff.mean() <= 1.25 and np.percentile(diff, 99) <= 16 and diff.max() <= 24, (rel, diff.mean(),
                                                                                             diff.max())
    assert len(draft_errors) == len(SHAPES) + 1  # the JPEGs and the PNG were resized
    assert np.mean([m for m, _ in draft_errors]) > 0.2  # draft decoding did engage

    assert draft.get(rel) is not None  # a source-root-relative path
    assert draft.get(source["root"] / source["corrupt"]) is None  # bad file: the caller decodes it (and fails)
    assert draft.get(tmp_path / "elsewhere.jpg") is None


def test_changed_source_is_not_served(source, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(source["root"], root)
    out = tmp_path / "out"
    prep.main([str(root), "--out", str(out), "--size", str(SIZE), "--shard-size", "4", "--num-proc", "1"])
    store = PreparedImages.open(out)
    store = pickle.loads(pickle.dumps(store))  # as a DataLoader worker receives it
    touched, rewritten, kept = (root / rel for rel in sorted(source["good"])[:3])
    for path in (touched, rewritten, kept):
        assert store.get(path) is not None
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    rewritten.write_bytes(rewritten.read_bytes() + b"\0")
    assert store.get(touched) is None and store.get(rewritten) is None
    assert store.get(kept) is not None
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert store.get(touched) is not None

    # prepared again: only the shard of the rewritten file is redone, and the store serves its new pixels
    Image.fromarray(np.full((300, 360), 200, dtype=np.uint8)).save(rewritten, format="JPEG", quality=95)
    summary = prep.prepare(root, out, size=SIZE, shard_size=4, num_proc=1, progress=False)
    assert summary["prepared_now"] == 4
    pixels, original = PreparedImages.open(out).get(rewritten)
    assert original == (300, 360) and abs(float(pixels.mean()) - 200) < 2


def test_resume_with_another_plan_is_refused(source, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(source["root"]), "--out", str(out), "--shard-size", "4", "--num-proc", "1"]
    prep.main([*args, "--size", "64"])
    with pytest.raises(SystemExit) as exit_info:
        prep.main([*args, "--size", str(SIZE)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "another plan" in message and "size: 64 -> 128" in message and "--overwrite" in message
    assert json.loads((out / "prepared.json").read_text())["size"] == 64  # the store was left as it was

    prep.main([*args, "--size", str(SIZE), "--overwrite"])
    assert PreparedImages.open(out).size == SIZE


def test_open_refuses_an_incomplete_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete prepared image store"):
        PreparedImages.open(tmp_path)


def test_training_reads_the_prepared_shards(phantom_root, tmp_path, dataset_cache, monkeypatch):
    """The loaders serve a prepared store's pixels (no source is decoded) with the boxes of the original images."""
    import modeling_anatomy_vlm.image_processing_anatomy_vlm as image_processing
    from conftest import tiny_train_config
    from modeling_anatomy_vlm import AnatomyVLMConfig
    from train.data.common import make_transform
    from train.data.imagenome import load_imagenome
    from train.engine import train

    out = tmp_path / "prepared"
    prep.main([str(phantom_root / "mimic-cxr-jpg"), "--out", str(out), "--size", "96", "--num-proc", "1"])
    names, findings = AnatomyVLMConfig().region_names, AnatomyVLMConfig().findings
    dataset = load_imagenome(phantom_root, "train", region_names=names, findings=findings)
    processor = AnatomyVLMImageProcessor(size=64)
    decoded = dataset.with_transform(make_transform(processor))[:6]

    def no_decoding(image):
        raise AssertionError(f"{image} was decoded though the prepared store holds it")

    monkeypatch.setattr(image_processing, "load_grayscale", no_decoding)
    served = dataset.with_transform(make_transform(processor, prepared_dir=out))[:6]
    assert all(served["image_ok"])
    for a, b in zip(served["pixels"], decoded["pixels"]):
        assert a.shape == b.shape == (1, 64, 64) and a.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() <= 1.0  # draft decode + two resizes vs one: under a grey level
    for key in ("target_boxes", "box_mask", "original_sizes"):
        for a, b in zip(served[key], decoded[key]):
            assert torch.equal(a, b), key

    with pytest.raises(ValueError, match="--size 128 or more"):
        make_transform(AnatomyVLMImageProcessor(size=128), prepared_dir=out)

    config = tiny_train_config(phantom_root, tmp_path / "run", steps=(1, 1, 1))
    config["data"]["prepared_dir"] = str(out)
    train(config)  # every image from the shards: the decoder above would fail the run
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_the_segmentation_task_refuses_a_prepared_store():
    from train.config import ConfigError, load_config

    config = ROOT / "configuration" / "train" / "segmentation_phantom.yaml"
    with pytest.raises(ConfigError, match="data.prepared_dir: the segmentation task reads the image files"):
        load_config(config, ["data.prepared_dir=prepared"])
