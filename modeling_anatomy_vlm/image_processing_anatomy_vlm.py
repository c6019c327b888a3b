"""Image processor of Anatomy-VLM: chest X-rays from PIL, numpy, PNG, JPEG or DICOM to square model inputs.

Every input becomes a float grayscale image in [0, 1] (DICOM: modality LUT, VOI LUT / window, MONOCHROME1
inverted), is resized with its aspect ratio kept so the long side equals `size`, padded at the bottom and
right with black, normalised, and repeated to the tower's channel count. Boxes map between original pixels
and normalised (cx, cy, w, h) in that padded square.
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

MIN_IMAGE_SIDE = 32
FILE_FORMATS = ("PNG", "JPEG", "TIFF")  # read through PIL; DICOM through pydicom
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageLoadError(ValueError):
    """An input that cannot be used as a chest X-ray; the message names the input and the problem."""


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    filename = getattr(image, "filename", None)
    return filename or f"<{type(image).__name__} input>"


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot be read ({err})") from err


def _to_unit_range(array: np.ndarray) -> np.ndarray:
    """Integer images by their dtype's range; other data by its own min-max."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if array.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        return array
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _rgb_to_gray(array: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of the first three channels (alpha ignored); exact for gray RGB."""
    rgb = _to_unit_range(array[..., :3])
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _array_to_gray(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return _rgb_to_gray(array)
    if array.ndim != 2:
        raise ImageLoadError(f"{name}: expected a 2-D grayscale or H x W x 3/4 colour array, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageLoadError(f"{name}: image contains NaN or infinite values")
    return _to_unit_range(array)


def _pil_to_gray(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in ("RGB", "RGBA"):
        return _rgb_to_gray(np.asarray(image))
    if image.mode == "LA":
        return _to_unit_range(np.asarray(image)[..., 0])
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return _rgb_to_gray(np.asarray(image.convert("RGB")))
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32) / 65535.0
    if image.mode == "I":  # 16-bit PNGs opened as 32-bit integers
        array = np.asarray(image)
        if array.min() >= 0 and array.max() <= 65535:
            return array.astype(np.float32) / 65535.0
    return _array_to_gray(np.asarray(image), name)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    name = str(path)
    try:
        dataset = pydicom.dcmread(path)
        return _dicom_to_gray(dataset, dataset.pixel_array, name)
    except ImageLoadError:
        raise
    except Exception as err:  # pydicom raises many types for truncated, undecodable or inconsistent files
        raise ImageLoadError(f"{name}: unreadable DICOM ({type(err).__name__}: {err})") from err


def _dicom_to_gray(dataset, pixels: np.ndarray, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        raise ImageLoadError(f"{name}: multi-frame DICOM is not supported (one radiograph per file)")
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _array_to_gray(pixels, name)
    stored = apply_modality_lut(pixels, dataset)  # integers, or floats where a rescale slope / intercept applies
    values = stored.astype(np.float64)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center = float(np.atleast_1d(dataset.WindowCenter)[0])
        width = max(float(np.atleast_1d(dataset.WindowWidth)[0]), 1.0)
        gray = np.clip((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)  # DICOM linear window
    elif "VOILUTSequence" in dataset:
        # A VOI LUT is indexed by integer values: it gets them (pydicom warns about a float input).
        gray = _to_unit_range(apply_voi(np.rint(stored).astype(np.int64), dataset).astype(np.float64))
    elif "RescaleSlope" in dataset or "RescaleIntercept" in dataset or pixels.dtype.kind == "i":
        gray = _to_unit_range(values)
    else:
        bits = int(getattr(dataset, "BitsStored", 8 * pixels.dtype.itemsize))
        gray = np.clip(values / (2**bits - 1), 0.0, 1.0)
    gray = gray.astype(np.float32)
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def _read_file(path: Path) -> np.ndarray:
    name = str(path)
    if not path.exists():
        raise ImageLoadError(f"{name}: file does not exist")
    if not path.is_file():
        raise ImageLoadError(f"{name}: not a file")
    if _is_dicom(path):
        return _read_dicom(path)
    try:
        with Image.open(path) as image:
            if image.format not in FILE_FORMATS:
                raise ImageLoadError(f"{name}: unsupported image type {image.format}; use PNG, JPEG or DICOM")
            image.load()
            return _pil_to_gray(image, name)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image file (or an unsupported type); use PNG, JPEG or DICOM") from err
    except Image.DecompressionBombError as err:  # PIL's own message does not name the file
        raise ImageLoadError(f"{name}: refused, too many pixels ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err


def load_grayscale(image) -> np.ndarray:
    """Any supported input -> float32 `[H, W]` grayscale in [0, 1] (white = dense, as on film).

    Raises `ImageLoadError` (a `ValueError`) naming the input for missing, corrupt, truncated, unsupported
    or too small images.
    """
    name = _describe(image)
    if isinstance(image, (str, os.PathLike)):
        gray = _read_file(Path(image))
    elif isinstance(image, Image.Image):
        try:
            gray = _pil_to_gray(image, name)
        except OSError as err:
            raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err
    elif isinstance(image, np.ndarray):
        gray = _array_to_gray(image, name)
    elif isinstance(image, torch.Tensor):
        gray = _array_to_gray(image.detach().cpu().numpy(), name)
    else:
        raise ImageLoadError(f"{name}: unsupported input type {type(image).__name__}; give a PIL image, array or path")
    if min(gray.shape) < MIN_IMAGE_SIDE:
        raise ImageLoadError(f"{name}: image is {gray.shape[1]}x{gray.shape[0]} px, smaller than {MIN_IMAGE_SIDE} px")
    return gray


class AnatomyVLMImageProcessor(BaseImageProcessor):
    r"""
    Turns chest X-rays into `pixel_values` of shape `[B, num_channels, size, size]`.

    Args:
        size (`int`, *optional*, defaults to 224): side of the square model input (= `vision_config.image_size`).
        num_channels (`int`, *optional*, defaults to 3): grayscale is repeated to this many channels.
        image_mean, image_std (`float` or a list of one per channel, *optional*, defaults to 0.5 and 0.5):
            normalisation of the [0, 1] image, e.g. the statistics a pretrained vision tower was trained with.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 224, num_channels: int = 3, image_mean: float = 0.5, image_std: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < MIN_IMAGE_SIDE:
            raise ValueError(f"AnatomyVLMImageProcessor: size must be an integer >= {MIN_IMAGE_SIDE}, got {size!r}")
        self.size = size
        self.num_channels = num_channels
        self.image_mean, self.image_std = self._statistic("image_mean", image_mean), self._statistic("image_std", image_std)
        if min(np.atleast_1d(self.image_std)) <= 0:
            raise ValueError(f"AnatomyVLMImageProcessor: image_std must be > 0, got {image_std!r}")

    def _statistic(self, name: str, value):
        """A float, or a list of one float per channel (a list of one is a float)."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(values) not in (1, self.num_channels):
            raise ValueError(f"AnatomyVLMImageProcessor: {name} needs 1 or {self.num_channels} values, got {value!r}")
        values = [float(v) for v in values]
        return values[0] if len(values) == 1 else values

    def _statistics(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as `[1 or C, 1, 1]` tensors on `device`."""
        return tuple(torch.tensor(np.atleast_1d(v), dtype=torch.float32, device=device).reshape(-1, 1, 1)
                     for v in (self.image_mean, self.image_std))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the image inside the padded square: long side = `size`, aspect kept."""
        scale = self.size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, images, boxes=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, boxes=boxes, **kwargs)

    def preprocess(self, images, boxes=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL images, numpy arrays, tensors, or paths to PNG / JPEG / DICOM).
            boxes: optional, per image an array `[R, 4]` of (x1, y1, x2, y2) in original pixels; NaN rows mean
                "region not annotated".

        Returns:
            `BatchFeature` with `pixel_values` `[B, C, S, S]`, `original_sizes` `[B, 2]` (height, width) and, with
            `boxes`, `boxes` `[B, R, 4]` normalised (cx, cy, w, h) and `box_mask` `[B, R]` (False for missing
            boxes and for boxes with no area left after clipping to the image).
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
            boxes = None if boxes is None else [boxes]
        if not images:
            raise ValueError("AnatomyVLMImageProcessor: no images given")
        pixel_values, original_sizes = [], []
        for image in images:
            gray = load_grayscale(image)
            original_sizes.append(gray.shape)
            pixel_values.append(self._resize_pad_normalise(gray))
        data = {
            "pixel_values": torch.stack(pixel_values),
            "original_sizes": torch.tensor(original_sizes, dtype=torch.long),
        }
        if boxes is not None:
            if len(boxes) != len(images):
                raise ValueError(f"AnatomyVLMImageProcessor: {len(boxes)} box arrays for {len(images)} images")
            mapped = [self.normalize_boxes(b, size) for b, size in zip(boxes, original_sizes)]
            data["boxes"] = torch.stack([m[0] for m in mapped])
            data["box_mask"] = torch.stack([m[1] for m in mapped])
        return BatchFeature(data=data, tensor_type=None)

    def _resize_pad_normalise(self, gray: np.ndarray) -> torch.Tensor:
        return self.normalize_pixels(self.resize_pad(gray)[None])[0]

    def resize_pad(self, gray, original_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`[H, W]` grayscale (float in [0, 1], or uint8) -> `[1, S, S]` float in [0, 1]: the long side resized to
        `size` (bilinear with antialiasing), padded with black at the bottom and right. `original_size` (H, W) is
        the size of the image `gray` was reduced from (a prepared copy): the result is laid out as for the original,
        which is what its boxes are normalised against."""
        gray = gray if isinstance(gray, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(gray))
        if gray.dtype == torch.uint8:
            gray = gray.float() / 255.0
        height, width = self.resized_size(*(original_size or gray.shape))
        image = gray.float()[None, None]
        if (height, width) != tuple(gray.shape):
            image = F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        canvas = torch.zeros(1, self.size, self.size, device=gray.device)
        canvas[:, :height, :width] = image[0].clamp(0.0, 1.0)
        return canvas

    def resize_pad_uint8(self, gray, original_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`resize_pad` rounded to `[1, S, S]` uint8: what training data loaders send (a quarter of float32's
        bytes, a twelfth of 3-channel float32's); `normalize_pixels` finishes it on the device. The rounding
        changes a pixel by at most half a grey level (1/510)."""
        return (self.resize_pad(gray, original_size) * 255.0).round_().to(torch.uint8)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 1, S, S]` (uint8, or float in [0, 1]) -> `pixel_values` `[B, num_channels, S, S]` float32,
        normalised; runs on whatever device `pixels` is on."""
        pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        mean, std = self._statistics(pixels.device)
        return ((pixels.expand(-1, self.num_channels, -1, -1) - mean) / std).contiguous()

    def gray_from_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, S, S]` `pixel_values` -> `[B, S, S]` the [0, 1] grayscale they were made from (channel 0)."""
        mean, std = self._statistics(pixel_values.device)
        return pixel_values[:, 0].float() * std[0] + mean[0]

    def normalize_boxes(self, boxes, original_size) -> tuple[torch.Tensor, torch.Tensor]:
        """`[R, 4]` (x1, y1, x2, y2) original pixels -> (`[R, 4]` normalised (cx, cy, w, h), `[R]` valid mask).

        Boxes are clipped to the image; missing (NaN) boxes and boxes with no area after clipping are masked
        and zero-filled."""
        height, width = original_size
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        present = ~torch.isnan(boxes).any(-1)
        boxes = torch.nan_to_num(boxes)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        valid = present & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        new_height, new_width = self.resized_size(height, width)
        scale = torch.tensor([new_width / width, new_height / height] * 2) / self.size
        x1, y1, x2, y2 = (boxes * scale).unbind(-1)
        cxcywh = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
        return torch.where(valid[:, None], cxcywh, torch.zeros_like(cxcywh)), valid

    def post_process_boxes(self, pred_boxes: torch.Tensor, original_sizes) -> torch.Tensor:
        """`[B, R, 4]` normalised (cx, cy, w, h) -> `[B, R, 4]` (x1, y1, x2, y2) in original pixels, clipped."""
        pred_boxes = pred_boxes.detach().float().cpu()
        out = torch.empty_like(pred_boxes)
        for i, (height, width) in enumerate(torch.as_tensor(original_sizes).tolist()):
            new_height, new_width = self.resized_size(height, width)
            sx, sy = self.size * width / new_width, self.size * height / new_height
            cx, cy, w, h = pred_boxes[i].unbind(-1)
            out[i] = torch.stack(
                [
                    ((cx - w / 2) * sx).clamp(0, width),
                    ((cy - h / 2) * sy).clamp(0, height),
                    ((cx + w / 2) * sx).clamp(0, width),
                    ((cy + h / 2) * sy).clamp(0, height),
                ],
                dim=-1,
            )
        return out
