"""Calibrated probabilities and an out-of-distribution (OOD) score for `AnatomyVLMModel.interpret`.

A checkpoint may hold `calibration.safetensors` next to `config.json`; `train.eval.calibration` fits it on the
data the model was trained on. This file reads, applies and writes it (it ships with the checkpoint).

* Probabilities: Platt scaling, one (scale, bias) per head, fitted on the validation split by log-loss:
  p = sigmoid(scale * z + bias), z being the image-vs-finding logit (global) or a region's prompt-pair log-odds
  ("<finding> in the <region>" vs "no <finding> in the <region>"). One pair per head rather than per finding,
  so free-text findings get it too. The probabilities are calibrated for images like that validation split (for
  the quickstart model: phantoms), not for other populations.
* OOD score: how unlike the training images an image is, from two distances, each the Mahalanobis distance of
  standardised features from the training images' mean under their Ledoit-Wolf-shrunk covariance, over sqrt(D)
  (so about 1 for a typical training image):
  - embedding: the image embedding: what the model itself sees;
  - image statistics of the processed image: the square roots of a 16-bin histogram of its gray values, their
    mean, standard deviation and mean absolute gradient, and a 4 x 4 grid of mean gray values (where the lungs,
    the mediastinum and the background are). They catch what an embedding can miss, above all a barely trained
    one: an inverted film, noise, a photograph.
  Each distance is divided by its median over the validation images and the score is the larger of the two: "how
  many times farther from the training images than a typical held-out image". The threshold was chosen on the
  validation split (its 99th percentile; see `train.eval.calibration`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import cached_file

CALIBRATION_FILE = "calibration.safetensors"
FORMAT = "anatomy-vlm-calibration/1"
HISTOGRAM_BINS = 16
LAYOUT_GRID = 4
IMAGE_STATISTICS = (*(f"sqrt_histogram_{i}" for i in range(HISTOGRAM_BINS)), "mean", "std", "gradient",
                    *(f"layout_{row}_{col}" for row in range(LAYOUT_GRID) for col in range(LAYOUT_GRID)))
# Features are standardised by the training images' standard deviation, but by at least this (the embeddings and
# the image statistics are unit-range quantities): a feature that never varied in training must not put every image
# that differs in it infinitely far away.
STD_FLOOR = 0.01
TENSORS = ("global_platt", "region_platt", "typical_distances", "ood_threshold",
           *(f"{name}_{key}" for name in ("embedding", "image") for key in ("center", "scale", "precision")))
# `from_pretrained` keyword arguments that say where a checkpoint's files are, passed on to `cached_file`.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def image_statistics(pixel_values: torch.Tensor, original_sizes, image_processor) -> torch.Tensor:
    """`[B, len(IMAGE_STATISTICS)]` statistics of the gray image inside each processed square (the padding left
    out): square roots of the fractions of its pixels in `HISTOGRAM_BINS` equal bins of [0, 1]; their mean,
    standard deviation and mean absolute difference between neighbouring pixels; the mean of each cell of a
    `LAYOUT_GRID` x `LAYOUT_GRID` grid, row by row."""
    gray = image_processor.gray_from_pixel_values(pixel_values.detach().float().cpu())
    rows = []
    for image, (height, width) in zip(gray, torch.as_tensor(original_sizes).tolist()):
        kept_rows, kept_cols = image_processor.resized_size(height, width)
        content = image[:kept_rows, :kept_cols].clamp(0.0, 1.0)
        histogram = torch.histc(content, bins=HISTOGRAM_BINS, min=0.0, max=1.0) / content.numel()
        steps = [content.diff(dim=dim).abs().mean() for dim in (0, 1) if content.shape[dim] > 1]
        gradient = torch.stack(steps).mean() if steps else torch.tensor(0.0)
        layout = F.adaptive_avg_pool2d(content[None], LAYOUT_GRID).flatten()
        summary = torch.stack([content.mean(), content.std(unbiased=False), gradient])
        rows.append(torch.cat([histogram.sqrt(), summary, layout]))
    return torch.stack(rows)


@dataclass
class PlattScaling:
    """p = sigmoid(scale * logit + bias)."""

    scale: float = 1.0
    bias: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * logits.float() + self.bias)


@dataclass
class GaussianDistance:
    """sqrt(z^T P z / D) for z = (x - center) / scale: the Mahalanobis distance, per dimension, of D features from
    a Gaussian fitted to the training images' standardised features (P: the inverse of its shrunk covariance)."""

    center: torch.Tensor  # [D] training mean
    scale: torch.Tensor  # [D] training standard deviation, at least STD_FLOOR
    precision: torch.Tensor  # [D, D]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.detach().float().cpu() - self.center) / self.scale  # [B, D]
        squared = torch.einsum("bd,de,be->b", z, self.precision, z)
        return (squared.clamp(min=0) / z.shape[-1]).sqrt()


@dataclass
class OODStatistics:
    """What `interpret` compares an image with: the training images' embeddings and image statistics."""

    embedding: GaussianDistance  # over the image embeddings [D]
    image: GaussianDistance  # over `image_statistics` [len(IMAGE_STATISTICS)]
    typical_distances: torch.Tensor  # [2] (embedding, image): medians over the validation images
    threshold: float  # on `scores`, chosen on the validation images

    def distances(self, image_embeds: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        """`[B, 2]` (embedding, image statistics) distances from the training images, in typical validation units."""
        return torch.stack([self.embedding(image_embeds), self.image(statistics)], dim=-1) / self.typical_distances

    def scores(self, image_embeds: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        """`[B]` OOD scores: the larger of the two distances."""
        return self.distances(image_embeds, statistics).amax(-1)


@dataclass
class Calibration:
    """A checkpoint's Platt scaling per head and OOD statistics; `info` records how they were fitted."""

    global_platt: PlattScaling
    region_platt: PlattScaling
    ood: OODStatistics
    info: dict = field(default_factory=dict)

    def ood_results(self, image_embeds, pixel_values, original_sizes, image_processor) -> list[dict]:
        """Per image `{"score", "threshold", "warning": score > threshold}` (what `interpret` reports)."""
        scores = self.ood.scores(image_embeds, image_statistics(pixel_values, original_sizes, image_processor))
        return [{"score": score, "threshold": self.ood.threshold, "warning": score > self.ood.threshold}
                for score in scores.tolist()]

    # ----------------------------------------------------------------------------------------------- file
    def save(self, folder) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        tensors = {
            "global_platt": torch.tensor([self.global_platt.scale, self.global_platt.bias]),
            "region_platt": torch.tensor([self.region_platt.scale, self.region_platt.bias]),
            "typical_distances": self.ood.typical_distances, "ood_threshold": torch.tensor([self.ood.threshold]),
        }
        for name in ("embedding", "image"):
            distance = getattr(self.ood, name)
            tensors.update({f"{name}_{key}": getattr(distance, key) for key in ("center", "scale", "precision")})
        tensors = {name: value.detach().float().cpu().contiguous() for name, value in tensors.items()}
        metadata = {"format": FORMAT, "image_statistics": json.dumps(IMAGE_STATISTICS), "info": json.dumps(self.info)}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a `calibration.safetensors`; a `ValueError` names the file when it is not one this code reads."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file (format {metadata.get('format')!r})")
            if json.loads(metadata.get("image_statistics", "null")) != list(IMAGE_STATISTICS):
                raise ValueError(f"{path}: fitted on other image statistics; refit it (train.eval.calibration)")
            t = {name: handle.get_tensor(name) for name in handle.keys()}
        missing = sorted(set(TENSORS) - set(t))
        if missing:
            raise ValueError(f"{path}: incomplete, lacks {missing}; refit it (train.eval.calibration)")

        def distance(name):
            return GaussianDistance(t[f"{name}_center"], t[f"{name}_scale"], t[f"{name}_precision"])

        ood = OODStatistics(distance("embedding"), distance("image"), t["typical_distances"],
                            float(t["ood_threshold"][0]))
        return cls(PlattScaling(*t["global_platt"].tolist()), PlattScaling(*t["region_platt"].tolist()), ood,
                   json.loads(metadata["info"]))

    @classmethod
    def from_pretrained(cls, name_or_path, **hub_kwargs) -> "Calibration | None":
        """The calibration of a checkpoint folder or Hub repository; None when it has none."""
        path = cached_file(str(name_or_path), CALIBRATION_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub_kwargs)
        return None if path is None else cls.load(path)


class CalibratedModelMixin:
    """`model.calibration`: the checkpoint's `Calibration`, or None. `from_pretrained` reads it from the checkpoint's
    `calibration.safetensors`; `save_pretrained` writes it next to the weights."""

    calibration: Calibration | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if pretrained_model_name_or_path is not None:
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
            model.calibration = Calibration.from_pretrained(
                pretrained_model_name_or_path, **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.calibration is not None and kwargs.get("is_main_process", True):
            self.calibration.save(save_directory)
