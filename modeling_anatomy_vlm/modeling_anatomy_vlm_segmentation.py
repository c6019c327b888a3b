"""Semantic segmentation on the Anatomy-VLM vision encoder: multi-level ViT features + a light U-Net decoder.

The paper's transfer protocol (CheXmask heart and lungs, SIIM-ACR pneumothorax) puts the same U-Net-style
decoder on every encoder and trains it with the encoder frozen, fully fine-tuned, or (here also) adapted with
LoRA. Classes are independent sigmoid masks (multi-label: lung and heart masks may overlap).

Segmentation settings live in `AnatomyVLMConfig` as plain extra attributes (read with defaults):

* ``id2label``: the mask classes, ``{0: "right lung", 1: "left lung", 2: "heart"}`` (``num_labels`` follows).
* ``segmentation_feature_layers``: 0-based encoder blocks whose patch tokens feed the decoder, shallow to deep
  (default: 4 evenly spaced, the last block included).
* ``segmentation_decoder_channels``: one width per feature layer (deepest first) plus one for the
  full-resolution stage (default: 256, 128, 64, ... halving, at least 16).
* ``segmentation_dice_weight``, ``segmentation_bce_weight``: loss weights (default 1.0 each).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_anatomy_vlm import AnatomyVLMConfig
from .modeling_anatomy_vlm import AnatomyVisionTransformer, AnatomyVLMPreTrainedModel

DEFAULT_NUM_FEATURE_LAYERS = 4
MIN_DECODER_CHANNELS = 16
# peft target: the Linear layers of every encoder block (fused attention qkv and output, MLP).
ENCODER_LORA_TARGET_MODULES = r"vision_model\.blocks\.\d+\.(attn\.qkv|attn\.proj|fc1|fc2)"


@dataclass
class AnatomyVLMSemanticSegmenterOutput(SemanticSegmenterOutput):
    """
    Outputs of [`AnatomyVLMForSemanticSegmentation.forward`]. B = batch, C = classes, S = input side,
    g = S / patch size, hidden = encoder width.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `segmentation_dice_weight * loss_dice + segmentation_bce_weight * loss_bce`, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(B, C, S, S)`):
            Per-class sigmoid logits at the full input resolution, in the processed (resized + bottom/right
            padded) image.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            With `output_hidden_states`, the decoder's inputs: one `(B, hidden, g, g)` patch-token grid per
            feature layer, shallow to deep.
        attentions: always `None` (the encoder uses fused SDPA kernels).
        loss_dice, loss_bce (`torch.FloatTensor` of shape `()`, *optional*): the unweighted loss terms.
    """

    loss_dice: torch.FloatTensor | None = None
    loss_bce: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------- losses
def _valid_weights(valid_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`[B, H, W]` or `[B, C, H, W]` bool -> float weights broadcastable to `like` (`[B, C, H, W]`)."""
    if valid_mask is None:
        return None
    if valid_mask.dim() == 3:
        valid_mask = valid_mask[:, None]
    return valid_mask.to(like.dtype).expand_as(like)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, valid_mask: torch.Tensor | None = None, smooth: float = 1.0):
    """Mean over images and classes of 1 - soft Dice; pixels outside `valid_mask` (padding) do not count.

    `smooth` keeps the loss defined for empty masks (an empty prediction of an empty mask scores 1), which
    most SIIM-ACR images are.
    """
    probs, labels = logits.float().sigmoid(), labels.float()
    weights = _valid_weights(valid_mask, probs)
    if weights is not None:
        probs, labels = probs * weights, labels * weights
    intersection = (probs * labels).sum((-2, -1))  # [B, C]
    total = probs.sum((-2, -1)) + labels.sum((-2, -1))
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, valid_mask: torch.Tensor | None = None):
    """Per-pixel sigmoid cross-entropy averaged over the valid pixels of every class."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    weights = _valid_weights(valid_mask, loss)
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------- settings
def segmentation_feature_layers(config: AnatomyVLMConfig) -> list[int]:
    """The encoder blocks (0-based, shallow to deep) feeding the decoder; validated against the tower."""
    vision = config.vision_config
    num_blocks, patch = vision.num_hidden_layers, vision.patch_size
    layers = getattr(config, "segmentation_feature_layers", None)
    if layers is None:
        count = min(DEFAULT_NUM_FEATURE_LAYERS, int(math.log2(patch)) + 1, num_blocks)
        layers = [max(0, math.ceil((i + 1) * num_blocks / count) - 1) for i in range(count)]
    layers = list(layers)
    if not layers or any(not isinstance(i, int) or not 0 <= i < num_blocks for i in layers):
        raise ValueError(
            f"AnatomyVLMConfig: segmentation_feature_layers must be a non-empty list of block indices in "
            f"[0, {num_blocks}), got {layers!r}"
        )
    if layers != sorted(layers):
        raise ValueError(f"AnatomyVLMConfig: segmentation_feature_layers must go from shallow to deep, got {layers!r}")
    if 2 ** (len(layers) - 1) > patch:
        raise ValueError(
            f"AnatomyVLMConfig: {len(layers)} segmentation_feature_layers need skip resolutions up to "
            f"{2 ** (len(layers) - 1)}x the patch grid, finer than the patch size {patch}; use at most "
            f"{int(math.log2(patch)) + 1} layers"
        )
    return layers


def segmentation_decoder_channels(config: AnatomyVLMConfig, num_levels: int) -> list[int]:
    """Decoder widths: one per feature level (deepest first) and one for the full-resolution stage."""
    channels = getattr(config, "segmentation_decoder_channels", None)
    if channels is None:
        return [max(MIN_DECODER_CHANNELS, 256 >> i) for i in range(num_levels + 1)]
    channels = list(channels)
    if len(channels) != num_levels + 1 or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(
            f"AnatomyVLMConfig: segmentation_decoder_channels must be {num_levels + 1} positive integers "
            f"(one per feature layer, deepest first, then the full-resolution stage), got {channels!r}"
        )
    return channels


# ----------------------------------------------------------------------------------------------------- decoder
class SegmentationConvBlock(nn.Module):
    """The U-Net unit: two 3x3 convolutions, each followed by GroupNorm (batch-size independent) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        groups = math.gcd(8, out_channels)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchUnshuffle(nn.Module):
    """Each patch token -> a `factor x factor` block of `channels` pixels (1x1 conv + pixel shuffle).

    Equivalent to a stride-`factor` transposed convolution: a token encodes the content of its whole patch,
    so a learned linear map can decode sub-patch detail for a finer skip connection.
    """

    def __init__(self, hidden_size: int, channels: int, factor: int):
        super().__init__()
        self.proj = nn.Conv2d(hidden_size, channels * factor * factor, 1)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(grid))


class SegmentationClassifier(nn.Conv2d):
    """1x1 convolution from the decoder's last features to one logit map per class (He-initialised)."""

    def __init__(self, in_channels: int, num_labels: int):
        super().__init__(in_channels, num_labels, 1)


class AnatomySegmentationDecoder(nn.Module):
    """
    U-Net-style decoder over n encoder feature grids (all at the patch grid g), deepest first:

    * level 0: the deepest grid, 1x1-projected to `channels[0]` at g;
    * level i = 1 .. n-1: upsample 2x to g * 2^i, concatenate the i-th next-shallower grid unshuffled to
      that resolution, fuse with a conv block -> `channels[i]`;
    * full resolution: upsample to S, concatenate a conv stem of the input pixels (edges the patch tokens
      cannot carry), fuse -> `channels[n]`, 1x1 classifier -> one logit map per class.
    """

    def __init__(self, hidden_size: int, num_channels: int, channels: list[int], num_labels: int):
        super().__init__()
        num_levels = len(channels) - 1
        self.bottleneck = nn.Conv2d(hidden_size, channels[0], 1)
        self.skips = nn.ModuleList(PatchUnshuffle(hidden_size, channels[i], 2**i) for i in range(1, num_levels))
        self.fuse = nn.ModuleList(
            SegmentationConvBlock(channels[i - 1] + channels[i], channels[i]) for i in range(1, num_levels)
        )
        self.stem = SegmentationConvBlock(num_channels, channels[-1])
        self.head = SegmentationConvBlock(channels[num_levels - 1] + channels[-1], channels[-1])
        self.classifier = SegmentationClassifier(channels[-1], num_labels)

    def forward(self, feature_maps: list[torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
        """`feature_maps`: `[B, hidden, g, g]` grids, shallow to deep; returns `[B, num_labels, S, S]` logits."""
        deepest_first = feature_maps[::-1]
        x = self.bottleneck(deepest_first[0])
        for grid, skip, fuse in zip(deepest_first[1:], self.skips, self.fuse, strict=True):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = fuse(torch.cat([x, skip(grid)], dim=1))
        x = F.interpolate(x, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        x = self.head(torch.cat([x, self.stem(pixel_values)], dim=1))
        return self.classifier(x)


# ----------------------------------------------------------------------------------------------------- models
class AnatomyVLMForSemanticSegmentation(AnatomyVLMPreTrainedModel):
    """
    The Anatomy-VLM vision encoder (no text tower, no heads) with a U-Net-style decoder predicting
    `config.num_labels` sigmoid masks (names in `config.id2label`) at the input resolution.

    Start from a trained Anatomy-VLM with `from_anatomy_vlm(checkpoint, labels=[...])`; then train the decoder
    only (`freeze_encoder()`), everything (default), or LoRA adapters on the encoder
    (`peft.get_peft_model(model, model.encoder_lora_config())`).
    """

    def __init__(self, config: AnatomyVLMConfig):
        super().__init__(config)
        self.feature_layers = segmentation_feature_layers(config)
        vision = config.vision_config
        channels = segmentation_decoder_channels(config, len(self.feature_layers))
        config.segmentation_feature_layers, config.segmentation_decoder_channels = self.feature_layers, channels
        self.vision_model = AnatomyVisionTransformer(config)
        self.decoder = AnatomySegmentationDecoder(vision.hidden_size, vision.num_channels, channels, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if isinstance(module, SegmentationClassifier):
            # It reads ReLU features with no norm after it: at the tower's std 0.02 its logits start near 0 and
            # training can settle where a class's logits stay below 0 everywhere (the heart from the conv-stem
            # quickstart encoder: Dice 0 after 300 steps, frozen or full). With He init it does not.
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            module.bias.zero_()

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_anatomy_vlm(
        cls,
        path_or_model,
        labels: list[str],
        feature_layers: list[int] | None = None,
        decoder_channels: list[int] | None = None,
        **from_pretrained_kwargs,
    ) -> "AnatomyVLMForSemanticSegmentation":
        """
        A segmentation model whose encoder is copied from an Anatomy-VLM and whose decoder is new.

        Args:
            path_or_model: a checkpoint folder or Hub id saved by any Anatomy-VLM model class (only its
                `vision_model.*` weights are read), or such a model instance (merge PEFT adapters first).
            labels: the mask class names, in output channel order.
            feature_layers, decoder_channels: `segmentation_feature_layers` / `segmentation_decoder_channels`
                (module docstring); defaults when `None`.
            from_pretrained_kwargs: passed to `from_pretrained` when loading a checkpoint (e.g. `revision`).
        """
        labels = list(labels)
        if not labels or len(set(labels)) != len(labels) or not all(isinstance(n, str) and n for n in labels):
            raise ValueError(f"from_anatomy_vlm: labels must be unique non-empty strings, got {labels!r}")
        if isinstance(path_or_model, AnatomyVLMPreTrainedModel):
            source = path_or_model
        else:
            source = AnatomyVisionEncoder.from_pretrained(path_or_model, **from_pretrained_kwargs)
        inherited = {k: v for k, v in source.config.to_dict().items() if k not in _NOT_INHERITED_CONFIG_KEYS}
        config = AnatomyVLMConfig.from_dict(
            {
                **inherited,
                "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)},
                "segmentation_feature_layers": feature_layers,
                "segmentation_decoder_channels": decoder_channels,
            }
        )
        model = cls(config)
        model.vision_model.load_state_dict(source.vision_model.state_dict())
        return model

    def freeze_encoder(self):
        """Train the decoder only (the paper's frozen-encoder transfer)."""
        self.vision_model.requires_grad_(False)
        return self.train(self.training)

    def unfreeze_encoder(self):
        """Train encoder and decoder (full fine-tuning)."""
        self.vision_model.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen encoder (frozen mode, or a LoRA base) keeps its BatchNorm statistics (conv patch embedding):
        # updating them in train mode would change the encoder that "frozen" promises to leave alone.
        for module in self.vision_model.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    @classmethod
    def encoder_lora_config(cls, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs):
        """A `peft.LoraConfig` putting adapters on every encoder Linear (attention qkv / proj, MLP fc1 / fc2)
        and training + saving the whole decoder (`modules_to_save`). Use with `peft.get_peft_model`;
        `merge_and_unload()` gives back a plain `AnatomyVLMForSemanticSegmentation`."""
        from peft import LoraConfig  # training-time dependency, imported only when asked for

        return LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=ENCODER_LORA_TARGET_MODULES,
            modules_to_save=["decoder"],
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------- forward
    def get_feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """`[B, hidden, g, g]` patch-token grids after each feature layer (shallow to deep), through the tower's
        final LayerNorm (as DINOv2's intermediate features). The anatomy queries stay in the sequence, as in
        pre-training; blocks deeper than the last feature layer are not run."""
        tower = self.vision_model
        x = tower.embeddings(pixel_values)
        x = torch.cat([x, tower.anatomy_queries(x.shape[0])], dim=1)  # [B, 1 + N + Q, hidden]
        states = {}
        for index, block in enumerate(tower.blocks[: self.feature_layers[-1] + 1]):
            if tower.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in self.feature_layers:
                states[index] = x
        grid = tower.embeddings.grid_size
        maps = []
        for index in self.feature_layers:
            patches = tower.norm(states[index][:, 1 : 1 + grid * grid])  # [B, N, hidden]
            maps.append(patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid))
        return maps

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AnatomyVLMSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`[B, C, S, S]`): from `AnatomyVLMImageProcessor`.
            labels (`[B, num_labels, S, S]` float or bool, *optional*): target masks in the processed image;
                give the Dice + BCE `loss`.
            valid_mask (`[B, S, S]` or `[B, num_labels, S, S]` bool, *optional*): pixels that count in the loss
                (False on the processor's padding, or for a class not annotated in an image); default: all.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        feature_maps = self.get_feature_maps(pixel_values)
        logits = self.decoder(feature_maps, pixel_values)
        output = AnatomyVLMSemanticSegmenterOutput(
            logits=logits, hidden_states=tuple(feature_maps) if output_hidden_states else None
        )
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} do not match the logits {tuple(logits.shape)} "
                    "([batch, num_labels, size, size]); resize masks with the image processor's geometry"
                )
            output.loss_dice = dice_loss(logits, labels, valid_mask)
            output.loss_bce = bce_loss(logits, labels, valid_mask)
            output.loss = (
                getattr(self.config, "segmentation_dice_weight", 1.0) * output.loss_dice
                + getattr(self.config, "segmentation_bce_weight", 1.0) * output.loss_bce
            )
        return output if return_dict else output.to_tuple()


class AnatomyVisionEncoder(AnatomyVLMPreTrainedModel):
    """Only the vision tower of an Anatomy-VLM checkpoint: what `from_anatomy_vlm` reads from a folder
    (text tower, heads and any decoder in the checkpoint are skipped)."""

    _keys_to_ignore_on_load_unexpected = [r"^(?!vision_model\.)"]

    def __init__(self, config: AnatomyVLMConfig):
        super().__init__(config)
        self.vision_model = AnatomyVisionTransformer(config)
        self.post_init()


# Config entries a new segmentation model does not take from its source: the source's class mapping and labels.
_NOT_INHERITED_CONFIG_KEYS = {
    "auto_map",
    "architectures",
    "custom_pipelines",
    "id2label",
    "label2id",
    "num_labels",
    "segmentation_feature_layers",
    "segmentation_decoder_channels",
    "transformers_version",
    "_name_or_path",
}
