"""Safe to serve and safe to resume: model locations, cache keys, checkpoints, hostile images, kill -9."""

import json
import logging
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, write_dicom
from modeling_anatomy_vlm import AnatomyVLMConfig, ImageLoadError
from modeling_anatomy_vlm.image_processing_anatomy_vlm import load_grayscale
from conftest import tiny_train_config
from train.data.common import file_signature
from train.data.imagenome import load_imagenome
from train.engine import train
from train.engine.checkpoint import (
    FROZEN_FILE, STATE_FILE, complete_checkpoints, latest_checkpoint, leave_frozen_weights_out, read_state,
)
from train.engine.hub import resolve_model_location

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------------------------- model location
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("value", ["outptus/quickstart", "./model", "~/no-such-model-folder", "/no/such/model",
                                   "org/name"])
def test_a_missing_folder_is_an_error_naming_it_without_asking_the_hub(value, no_network):
    with pytest.raises(FileNotFoundError, match=f"{value}: no such model folder"):
        resolve_model_location(value)


def test_a_folder_loads_offline_and_the_hub_only_by_name_at_a_pinned_commit(tiny_model_and_processor, tmp_path,
                                                                            monkeypatch, no_network):
    from transformers import AutoModel, AutoProcessor

    model, processor = tiny_model_and_processor
    model.save_pretrained(tmp_path / "org" / "name")
    processor.save_pretrained(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    location, options = resolve_model_location("org/name")  # a Hub-id-shaped name that is a local folder
    assert (location, options) == ("org/name", {"trust_remote_code": True, "local_files_only": True})
    loaded = AutoModel.from_pretrained(location, **options)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert AutoProcessor.from_pretrained(location, **options).image_processor.size == processor.image_processor.size

    assert resolve_model_location(f"hf://org/name@{COMMIT}") == (
        "org/name", {"trust_remote_code": True, "revision": COMMIT})
    weights_only = resolve_model_location("hf://org/name", trust_remote_code=False)
    assert weights_only == ("org/name", {"trust_remote_code": False})
    for unpinned in ("hf://org/name", "hf://org/name@main", "hf://org/name@v1.0"):
        with pytest.raises(ValueError, match="runs only at a pinned commit"):
            resolve_model_location(unpinned)
    for malformed in ("hf://", "hf://org/name/extra", "hf://org/name@"):
        with pytest.raises(ValueError, match="not a Hub reference"):
            resolve_model_location(malformed)
    assert resolve_model_location("name", base=tmp_path / "org")[0] == str(tmp_path / "org" / "name")
    with pytest.raises(FileNotFoundError, match=rf"outptus/quickstart: no such model folder \({tmp_path}/outptus"):
        resolve_model_location("outptus/quickstart", base=tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="weights.safetensors: is a file"):
        resolve_model_location("weights.safetensors")


# ----------------------------------------------------------------------------------------------- Arrow cache key
def test_a_scene_graph_edited_in_place_is_seen_by_the_cache(phantom_root, tmp_path, dataset_cache):
    root = shutil.copytree(phantom_root, tmp_path / "copy")
    defaults = AnatomyVLMConfig()
    load = lambda: load_imagenome(root, "train", region_names=defaults.region_names, findings=defaults.findings)
    row = load()[0]
    path = root / "chest-imagenome/silver_dataset/scene_graph" / f"{row['image_id']}_SceneGraph.json"
    graph = json.loads(path.read_text())
    said_absent = [f for f, label in zip(defaults.findings, row["global_labels"]) if label == 0]
    finding = next(f for f in said_absent if f"anatomicalfinding|no|{f}" in path.read_text())
    for item in graph["attributes"]:
        item["attributes"] = [[a.replace(f"|no|{finding}", f"|yes|{finding}") for a in group]
                              for group in item["attributes"]]
    path.write_text(json.dumps(graph))  # same file, same folder listing: only its size and mtime change
    assert load()[0]["global_labels"][defaults.findings.index(finding)] == 1


def test_a_folder_signature_covers_every_file_under_it(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.json").write_text("{}")
    (tmp_path / "a" / "y.json").write_text("{}")
    before = file_signature(tmp_path / "a")
    assert before.startswith("2 files:")
    edited = tmp_path / "a" / "b" / "x.json"
    edited.write_text("[]")  # same size; the mtime set apart explicitly (two writes can share a clock tick)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 1_000_000))
    assert file_signature(tmp_path / "a") != before
    assert file_signature(tmp_path / "missing") == "missing"


# ----------------------------------------------------------------------------------------------- hostile images
def _png_bomb(path, side: int = 20000):
    """A 1-bit `side` x `side` PNG: 400 megapixels in about 50 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows, compressor = bytes(1 + side // 8) * 1000, zlib.compressobj(9)
    data = b"".join(compressor.compress(rows) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_an_image_load_error_naming_the_file(tmp_path):
    bomb = _png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match=r"bomb.png: refused, too many pixels"):
        load_grayscale(bomb)


def test_a_dicom_voi_lut_is_applied_without_warnings(tmp_path):
    from pydicom.dataset import Dataset

    lut_values = [(v * v) >> 8 for v in range(4096)]  # non-linear: 12-bit input, 16-bit output
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
    lut.add_new(0x00283006, "US", lut_values)  # LUT Data
    pixels = (np.arange(64 * 48).reshape(64, 48) * 7 % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "voi.dcm", pixels, bits_stored=12, VOILUTSequence=[lut])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = load_grayscale(path)
    mapped = np.asarray(lut_values, dtype=np.float64)[pixels]
    expected = (mapped - mapped.min()) / (mapped.max() - mapped.min())
    np.testing.assert_allclose(gray, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_resume_latest_falls_back_past_a_corrupt_trainer_state(phantom_root, tmp_path, dataset_cache, caplog):
    output = tmp_path / "run"
    config = lambda **training: tiny_train_config(phantom_root, output, steps=(1, 1, 2), checkpoint_every=1,
                                                  keep_checkpoints=3, **training)
    train(config(stop_after_steps=3))
    folders = complete_checkpoints(output)
    assert [p.name for p in folders] == ["step_1", "step_2", "step_3"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]  # no partials
    weights = load_file(str(folders[-1] / "model.safetensors"))
    assert weights and not any(key.startswith("text_model.") for key in weights)  # the frozen tower stays out
    assert json.loads((folders[-1] / FROZEN_FILE).read_text())["parameters"] > 0

    state = folders[-1] / STATE_FILE
    state.write_text(state.read_text()[: len(state.read_text()) // 2])  # truncated
    with pytest.raises(FileNotFoundError, match=rf"step_3: not a complete checkpoint \({STATE_FILE} unreadable"):
        read_state(folders[-1])
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.train"):
        train(config(), resume="latest")
    assert "step_3: not a complete checkpoint" in caplog.text
    assert f"resumed from {folders[1]} (stage 2, step 1)" in caplog.text
    assert (output / "model" / "model.safetensors").is_file()
    assert latest_checkpoint(output).name == "step_4"


def test_frozen_weights_are_left_out_and_must_match_on_resume(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model[1].parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    leave_frozen_weights_out(accelerator, model)
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert set(load_file(str(tmp_path / "ckpt" / "model.safetensors"))) == {"1.weight", "1.bias"}
    trained = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.zero_()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert torch.equal(model[1].weight, trained)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # as if the run were resumed with another text encoder
    with pytest.raises(ValueError, match="trained with other frozen weights"):
        accelerator.load_state(str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------- kill -9
def _kill_when(proc, ready, delay: float, timeout: float = 120.0) -> None:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds (polled every 5 ms); returns early if it exits."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the training process made no progress")
        time.sleep(0.005)
    if delay:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_training_killed_at_random_points_ends_with_the_weights_of_an_uninterrupted_run(
        phantom_root, tmp_path, dataset_cache):
    data = shutil.copytree(phantom_root, tmp_path / "data")
    config = lambda output: tiny_train_config(data, output, steps=(15, 15, 15), checkpoint_every=1)
    # 45 steps: on an idle machine 9 steps finished before a later attempt could be killed (it resumed at the end).
    train(config(tmp_path / "straight"))  # also fills the Arrow cache the killed runs share
    output = tmp_path / "killed"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config(output)))
    checkpoints = output / "checkpoints"

    def trained_steps() -> int:
        last = latest_checkpoint(output)
        return read_state(last)["global_step"] if last else 0

    def writing_since(start: float) -> bool:  # a checkpoint folder changed after `start` and not complete
        try:
            return any(p.stat().st_mtime > start and not (p / STATE_FILE).is_file() for p in checkpoints.iterdir())
        except FileNotFoundError:  # no checkpoints yet, or one renamed or removed while we looked
            return False

    rng, kills_mid_write = random.Random(0), 0
    for attempt, when in enumerate(["writing", "anywhere", "writing", "anywhere", "writing", "never"]):
        resume = ["--resume", "latest"] if latest_checkpoint(output) else []
        log = tmp_path / f"attempt_{attempt}.log"
        with open(log, "w") as sink:
            start, done = time.time(), trained_steps()
            proc = subprocess.Popen([sys.executable, "-m", "train.run", "--config", str(tmp_path / "tiny.yaml"),
                                     *resume], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
            if when == "writing":  # SIGKILL as soon as this process is writing a checkpoint
                _kill_when(proc, lambda: writing_since(start), delay=0.0)
                kills_mid_write += writing_since(start)  # its unfinished folder is still there
            elif when == "anywhere":  # SIGKILL at a random moment once this process has trained a step
                _kill_when(proc, lambda: trained_steps() > done, delay=rng.uniform(0.0, 0.5))
        expected = 0 if when == "never" else -9
        assert proc.wait(timeout=300) == expected, log.read_text()[-3000:]
    assert kills_mid_write >= 1
    straight, killed = (load_file(str(tmp_path / name / "model" / "model.safetensors"))
                        for name in ("straight", "killed"))
    assert straight.keys() == killed.keys()
    assert [key for key in straight if not torch.equal(straight[key], killed[key])] == []
