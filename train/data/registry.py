"""Every dataset by name, for training and evaluation alike: `data.dataset` in a config, `--dataset` on the CLIs.

Two kinds of split:
* finding splits (the pre-training task and zero-shot evaluation): rows in the schema of `train.data.common`;
* mask splits (segmentation transfer): rows in the schema of `train.data.segmentation`.

    from train.data.registry import load_finding_split
    dataset = load_finding_split(DataConfig(dataset="iu_xray", root="iu-xray"), "all", region_names, findings)

Adding a dataset is one loader module plus one `DATASETS` entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from train.config import DataConfig, ConfigError, resolve_path


@dataclass(frozen=True)
class DatasetEntry:
    splits: tuple[str, ...]
    findings: Callable | None = None  # (data, split, region_names, findings, **options) -> datasets.Dataset
    masks: Callable | None = None     # (data, split, labels, **options) -> datasets.Dataset
    about: str = ""


def _root(data: DataConfig, key: str = "root"):
    value = getattr(data, key)
    if value is None:
        raise ConfigError(f"data.{key}: required for data.dataset={data.dataset!r}")
    path = resolve_path(value)
    if not path.exists():
        raise ConfigError(f"data.{key}: {path} does not exist")
    return path


def _imagenome_findings(data: DataConfig, split, region_names, findings, **options):
    from train.data.imagenome import load_imagenome

    return load_imagenome(_root(data), split, region_names=region_names, findings=findings, on_error=data.on_error,
                          max_images=data.max_images, num_proc=data.index_workers, **options)


def _iu_xray_findings(data: DataConfig, split, region_names, findings, **options):
    from train.data.iu_xray import load_iu_xray_root

    return load_iu_xray_root(_root(data), split, region_names=region_names, findings=findings,
                             on_error=data.on_error, max_images=data.max_images, **options)


def _phantom_masks(data: DataConfig, split, labels, **options):
    from train.data.segmentation import load_phantom_segmentation

    return load_phantom_segmentation(_root(data), split, labels, on_error=data.on_error, **options)


def _chexmask_masks(data: DataConfig, split, labels, **options):
    from train.data.chexmask import load_chexmask

    return load_chexmask(_root(data, "csv"), _root(data, "mimic_cxr_jpg_dir"), split=split, on_error=data.on_error,
                         min_quality=data.chexmask_min_quality, **options)


def _siim_masks(data: DataConfig, split, labels, **options):
    """SIIM-ACR has no official split: a fixed `val_fraction` of images (seed 0) is `validate`, the rest `train`."""
    from train.data.siim import load_siim_acr

    table = load_siim_acr(_root(data, "csv"), _root(data, "images_dir"), on_error=data.on_error, **options)
    parts = table.train_test_split(test_size=data.val_fraction, seed=0)
    return parts["test"] if split in ("validate", "test") else parts["train"]


DATASETS = {
    "imagenome": DatasetEntry(("train", "validate", "test"), findings=_imagenome_findings,
                              about="MIMIC-CXR-JPG + Chest ImaGenome (data.root holds chest-imagenome/, mimic-cxr-jpg/)"),
    "phantom": DatasetEntry(("train", "validate", "test"), findings=_imagenome_findings, masks=_phantom_masks,
                            about="the procedural phantom set, in the Chest ImaGenome layout, with its masks"),
    "iu_xray": DatasetEntry(("all",), findings=_iu_xray_findings,
                            about="IU-Xray / Open-i (data.root holds ecgen-radiology/ and NLMCXR_png/)"),
    "chexmask": DatasetEntry(("train", "validate", "test"), masks=_chexmask_masks,
                             about="CheXmask lungs + heart over MIMIC-CXR-JPG (data.csv, data.mimic_cxr_jpg_dir)"),
    "siim": DatasetEntry(("train", "validate"), masks=_siim_masks,
                         about="SIIM-ACR pneumothorax (data.csv, data.images_dir)"),
}


def entry(name: str, kind: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    found = DATASETS[name]
    if getattr(found, kind) is None:
        offer = [n for n, e in DATASETS.items() if getattr(e, kind) is not None]
        raise ConfigError(f"data.dataset: {name!r} has no {kind} labels; datasets with {kind}: {', '.join(offer)}")
    return found


def _check_split(name: str, found: DatasetEntry, split: str) -> None:
    if split not in found.splits and not (split == "valid" and "validate" in found.splits):
        raise ConfigError(f"{name} has the splits {', '.join(found.splits)}; got {split!r}")


def load_finding_split(data: DataConfig, split: str, region_names: Sequence[str], findings: Sequence[str],
                       **options):
    """A split with image-level and region-level finding labels, boxes and report phrases."""
    found = entry(data.dataset, "findings")
    _check_split(data.dataset, found, split)
    return found.findings(data, split, list(region_names), list(findings), **options)


def load_mask_split(data: DataConfig, split: str, labels: Sequence[str], **options):
    """A split with per-pixel masks of `labels`."""
    found = entry(data.dataset, "masks")
    _check_split(data.dataset, found, split)
    return found.masks(data, split, list(labels), **options)


def ensure_phantom(data: DataConfig) -> None:
    """Generate the phantom set `data.phantom` describes into `data.root` (an identical complete set is kept) and,
    with `data.prepared_dir`, its prepared image shards at the phantom's size (a store of another plan is replaced:
    it is derived from the phantom set alone)."""
    if data.phantom is None:
        return
    from train.data.phantom import generate_dataset

    if data.root is None:
        raise ConfigError("data.root: required where data.phantom is set (the folder the phantom set is written to)")
    spec = data.phantom
    root = generate_dataset(resolve_path(data.root), n=spec.n, seed=spec.seed, size=spec.size, workers=spec.workers)
    if data.prepared_dir is not None:
        from train.data.prepare import PrepareError, prepare

        source, out = Path(root) / "mimic-cxr-jpg", resolve_path(data.prepared_dir)
        try:
            prepare(source, out, size=spec.size, num_proc=spec.workers)
        except PrepareError:
            prepare(source, out, size=spec.size, num_proc=spec.workers, overwrite=True)
