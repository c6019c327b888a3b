import numpy as np
import pytest
import torch
from PIL import Image

from modeling_anatomy_vlm import AnatomyVLMImageProcessor
from tests.conftest import write_dicom


@pytest.fixture
def processor():
    return AnatomyVLMImageProcessor(size=64)


def test_output_shapes_and_padding(processor, chest_like_image):
    out = processor([chest_like_image, chest_like_image.T])
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    assert out["original_sizes"].tolist() == [[180, 140], [140, 180]]
    # Portrait 180x140 -> 64 x 50 content; columns 50.. are padding (black = -1 after normalisation).
    assert torch.all(out["pixel_values"][0, :, :, 50:] == -1.0)
    assert torch.all(out["pixel_values"][0, :, :, :49] > -1.0)


@pytest.mark.parametrize("shape", [(180, 140), (140, 180), (97, 301), (512, 512)])
def test_box_round_trip_through_resize_and_pad_within_one_pixel(processor, shape):
    height, width = shape
    rng = np.random.default_rng(0)
    x1, y1 = rng.uniform(0, width * 0.5, 20), rng.uniform(0, height * 0.5, 20)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, width * 0.5, 20), y1 + rng.uniform(2, height * 0.5, 20)], -1)
    normalised, valid = processor.normalize_boxes(boxes, (height, width))
    assert valid.all()
    back = processor.post_process_boxes(normalised[None], torch.tensor([[height, width]]))[0]
    assert np.abs(back.numpy() - boxes).max() <= 1.0


def test_boxes_are_clipped_and_missing_or_empty_ones_masked(processor):
    boxes = np.array([[-10, 5, 50, 60], [np.nan] * 4, [30, 30, 30, 80], [100, 10, 200, 20]], dtype=float)
    out = processor(np.zeros((100, 120), np.uint8), boxes=boxes)
    assert out["box_mask"].tolist() == [[True, False, False, True]]
    scale = 64 / 120
    cx, cy, w, h = out["boxes"][0, 0].tolist()
    assert (cx - w / 2) == pytest.approx(0.0, abs=1e-6)  # clipped at x = 0
    assert w == pytest.approx(50 * scale / 64, abs=1e-5)
    assert out["boxes"][0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out["boxes"][0, 3, 2].item() == pytest.approx(20 * scale / 64, abs=1e-5)  # clipped at x = 120


def test_8_bit_16_bit_rgb_and_rgba_inputs_agree(tmp_path, processor, chest_like_image):
    Image.fromarray(chest_like_image).save(tmp_path / "l8.png")
    Image.fromarray(chest_like_image.astype(np.uint16) * 257).save(tmp_path / "l16.png")
    rgb = np.repeat(chest_like_image[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full_like(chest_like_image[..., None], 255)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "l16.png").mode.startswith("I")  # really stored as 16-bit
    reference = processor(chest_like_image)["pixel_values"]
    for name in ("l8.png", "l16.png", "rgb.png", "rgba.png"):
        assert torch.allclose(processor(str(tmp_path / name))["pixel_values"], reference, atol=1e-5), name
    assert torch.allclose(processor(Image.fromarray(rgba))["pixel_values"], reference, atol=1e-5)
    assert torch.allclose(processor(chest_like_image.astype(np.uint16) * 257)["pixel_values"], reference, atol=1e-5)


def test_monochrome1_and_monochrome2_dicoms_give_the_same_pixel_values(tmp_path, processor, chest_like_image):
    values = chest_like_image.astype(np.uint16) * 16  # 12-bit data
    mono2 = write_dicom(tmp_path / "mono2.dcm", values, "MONOCHROME2", bits_stored=12)
    mono1 = write_dicom(tmp_path / "mono1.dcm", 4095 - values, "MONOCHROME1", bits_stored=12)
    a = processor(str(mono2))["pixel_values"]
    b = processor(str(mono1))["pixel_values"]
    assert torch.allclose(a, b, atol=1e-5)
    # And an 8-bit MONOCHROME1 DICOM of the PNG's pixels matches the PNG.
    mono1_8 = write_dicom(tmp_path / "mono1_8.dcm", 255 - chest_like_image, "MONOCHROME1", bits_stored=8)
    assert torch.allclose(processor(str(mono1_8))["pixel_values"], processor(chest_like_image)["pixel_values"], atol=1e-5)


def test_dicom_rescale_and_window_are_applied(tmp_path, processor):
    stored = np.tile(np.arange(0, 2000, 10, dtype=np.uint16), (64, 1))  # 64 x 200
    path = write_dicom(tmp_path / "window.dcm", stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1000,
                       WindowCenter=0, WindowWidth=400)
    from modeling_anatomy_vlm.image_processing_anatomy_vlm import load_grayscale

    gray = load_grayscale(str(path))
    hu = stored.astype(float) - 1000
    assert gray[0, hu[0] <= -200].max() == 0.0  # below the window: black
    assert gray[0, hu[0] >= 200].min() == 1.0  # above: white
    mid = int(np.argmin(np.abs(hu[0])))
    assert gray[0, mid] == pytest.approx(0.5, abs=0.01)


def _truncated_copy(source, target, keep=0.5):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated_png", "truncated_jpeg",
                                  "truncated_dicom", "tiny", "gif", "object"])
def test_bad_inputs_raise_a_value_error_naming_the_file(tmp_path, processor, chest_like_image, case):
    Image.fromarray(chest_like_image).save(tmp_path / "ok.png")
    Image.fromarray(chest_like_image).save(tmp_path / "ok.jpg", quality=90)
    write_dicom(tmp_path / "ok.dcm", chest_like_image.astype(np.uint16), bits_stored=8)
    inputs = {
        "missing": (str(tmp_path / "nope.png"), "does not exist"),
        "directory": (str(tmp_path), "not a file"),
        "text": (str(tmp_path / "notes.png"), "not an image"),
        "truncated_png": (str(_truncated_copy(tmp_path / "ok.png", tmp_path / "cut.png")), "corrupt or truncated"),
        "truncated_jpeg": (str(_truncated_copy(tmp_path / "ok.jpg", tmp_path / "cut.jpg", 0.3)), "corrupt or truncated"),
        "truncated_dicom": (str(_truncated_copy(tmp_path / "ok.dcm", tmp_path / "cut.dcm")), "unreadable DICOM"),
        "tiny": (np.zeros((20, 100), np.uint8), "smaller than 32 px"),
        "gif": (str(tmp_path / "a.gif"), "unsupported image type GIF"),
        "object": ({"not": "an image"}, "unsupported input type dict"),
    }
    (tmp_path / "notes.png").write_text("these are not pixels")
    Image.fromarray(chest_like_image).save(tmp_path / "a.gif")
    item, message = inputs[case]
    with pytest.raises(ValueError, match=message) as info:
        processor(item)
    if isinstance(item, str):
        assert item in str(info.value)
