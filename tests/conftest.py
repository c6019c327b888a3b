import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor

ROOT = Path(__file__).resolve().parents[1]
# Real public files some tests read (IU-Xray reports, the SIIM-ACR RLE CSV) ship in this wheel; `make test` fetches it.
WHEELS = ROOT / ".cache" / "wheels"

TINY_VISION = dict(
    model_type="vit", image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=128,
)


def tiny_config(**overrides) -> AnatomyVLMConfig:
    """A small ViT (64 px, 2 layers) with the embedded MiniLM text tower."""
    return AnatomyVLMConfig(vision_config=dict(TINY_VISION), projection_dim=32, **overrides)


def tiny_train_config(data_root, output_dir, steps=(2, 2, 2), **training) -> dict:
    """A three-stage training config (dict form) of the tiny model on `data_root`, batch 4, no logging."""
    return {
        "model": {"vision_config": dict(TINY_VISION), "projection_dim": 32},
        "data": {"root": str(data_root), "num_workers": 0, "on_error": "skip"},
        "training": {"output_dir": str(output_dir), "batch_size": 4, "log_with": None, "log_every": 1,
                     "checkpoint_every": 0, **training},
        "stages": [
            {"name": "detection", "steps": steps[0], "lr": 1e-3, "loss_weights": {"anatomy": 1.0}},
            {"name": "global", "steps": steps[1], "lr": 5e-4, "warmup_steps": 1, "loss_weights": {"anatomy": 1.0, "global": 1.0}},
            {"name": "fine", "steps": steps[2], "lr": 5e-4, "loss_weights": {"anatomy": 1.0, "global": 1.0, "fine": 1.0}},
        ],
    }



@pytest.fixture(scope="session")
def tiny_model_and_processor():
    import torch

    torch.manual_seed(0)
    config = tiny_config()
    model = AnatomyVLMModel.from_encoders(config).eval()
    return model, AnatomyVLMProcessor.from_model_config(config)


@pytest.fixture
def chest_like_image() -> np.ndarray:
    """A 8-bit grayscale test image with structure (two dark 'lungs' on a bright body), 180 x 140 px."""
    yy, xx = np.mgrid[0:180, 0:140]
    image = 200 - 0.3 * yy
    for cx in (40, 100):
        image = np.where(((xx - cx) / 25.0) ** 2 + ((yy - 80) / 55.0) ** 2 < 1, 60 + 0.2 * yy, image)
    return np.clip(image, 0, 255).astype(np.uint8)


# Prepended to the scripts that load a saved checkpoint in a fresh interpreter: the project itself must not be
# importable there, so only the code copied into the checkpoint can serve trust_remote_code.
BLOCK_PROJECT_IMPORTS = """
import importlib.abc, sys

class BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_anatomy_vlm":
            raise ImportError("modeling_anatomy_vlm is blocked in this test")

sys.meta_path.insert(0, BlockProject())
"""


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16, **elements):
    """Write a minimal uncompressed single-frame DICOM (what a PACS export looks like, minus patient data)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Test^Patient"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom set (40 studies, 192 px) in the MIMIC-CXR-JPG + Chest ImaGenome layout. Read-only: copy it
    before changing anything."""
    from train.data.phantom import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom") / "set", n=40, seed=3, size=192, progress=False)


@pytest.fixture
def dataset_cache(tmp_path, monkeypatch):
    """A private Arrow cache directory for the loaders."""
    monkeypatch.setenv("ANATOMY_VLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def real_reports(tmp_path_factory):
    """The folder of the 3,955 real Open-i reports (``ecgen-radiology/*.xml``) from ``data/NLMCXR_reports.tgz`` in
    the torchxrayvision wheel (no images)."""
    wheels = sorted(WHEELS.glob("torchxrayvision-*.whl"))
    if not wheels:
        pytest.skip(f"no torchxrayvision wheel in {WHEELS} (make test downloads it)")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        archive = wheel.read("torchxrayvision/data/NLMCXR_reports.tgz")
    root = tmp_path_factory.mktemp("nlmcxr")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root / "ecgen-radiology"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state: a test that built an Accelerator in fp32 must not decide the
    precision of the next test's training run (outside tests each run is its own process)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
