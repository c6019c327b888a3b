"""Anatomy-VLM: a ViT whose sequence is [CLS] + patches + one learnable query per anatomical region.

Each anatomy query predicts its region's box (query i is region i) and, concatenated with the mean patch
token, its region embedding; [CLS] with the max over patch tokens gives the global embedding. Both are aligned
with a frozen text encoder through a trainable projection (arXiv 2511.08402).
"""

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .calibration_anatomy_vlm import CalibratedModelMixin
from .configuration_anatomy_vlm import AnatomyVLMConfig
from .loss_anatomy_vlm import detection_loss, global_finding_loss, region_phrase_contrastive_loss
from .pipeline_anatomy_vlm import custom_pipelines
from .prompt_memo_anatomy_vlm import (
    PROMPT_EMBEDS_NAME,
    PromptMemo,
    checkpoint_file,
    read_prompt_embeds,
    text_encoder_fingerprint,
    write_prompt_embeds,
)
from .text_encoder_anatomy_vlm import build_text_tower, load_text_tower_weights, text_tower_embeds

# The objectives `forward` computes, by the name of their `loss_<name>` output and `loss_weights` key.
LOSS_TERMS = ("anatomy", "global", "fine", "region")


@dataclass
class AnatomyVLMOutput(ModelOutput):
    """
    Outputs of [`AnatomyVLMModel.forward`]. B = batch, Q = anatomy queries (29), D = projection dim,
    F = findings given, T = phrases given, N = patches.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Sum of the loss terms whose targets were given, each times its `forward(loss_weights=...)` weight.
        loss_anatomy, loss_global, loss_fine, loss_region (`torch.FloatTensor` of shape `()`, *optional*):
            Detection (L1 + GIoU, weighted by the config's `bbox_*_weight`), image-finding sigmoid, region-phrase
            InfoNCE and anatomy-wise prompt-pair terms, before `loss_weights`.
        pred_boxes (`torch.FloatTensor` of shape `(B, Q, 4)`):
            Normalised (cx, cy, w, h) of each region in the processed (resized + padded) image. Map them to
            original pixels with `AnatomyVLMImageProcessor.post_process_boxes`.
        image_embeds (`torch.FloatTensor` of shape `(B, D)`): L2-normalised global ([CLS]) embeddings.
        region_embeds (`torch.FloatTensor` of shape `(B, Q, D)`): L2-normalised region embeddings.
        global_logits (`torch.FloatTensor` of shape `(B, F)`, *optional*):
            Image-vs-finding logits (sigmoid gives the probability of each finding).
        region_logits (`torch.FloatTensor` of shape `(B, Q, T)`, *optional*): Region-vs-phrase logits.
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + N + Q, hidden)`): final vision tower states.
        logits_per_image (`torch.FloatTensor` of shape `(B, T)`, *optional*):
            CLIP-style image-vs-text logits for T texts given as `input_ids`; the sigmoid of each (not a softmax over
            the texts) is that text's probability, as for `global_logits`.
        logits_per_text (`torch.FloatTensor` of shape `(T, B)`, *optional*): `logits_per_image` transposed.
    """

    loss: torch.FloatTensor | None = None
    loss_anatomy: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    loss_fine: torch.FloatTensor | None = None
    loss_region: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    global_logits: torch.FloatTensor | None = None
    region_logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None


def _mlp_hidden_size(vision_config) -> int:
    if vision_config.model_type == "dinov2":
        return int(vision_config.hidden_size * vision_config.mlp_ratio)
    return vision_config.intermediate_size


class ConvPatchEmbedding(nn.Sequential):
    """A small CNN with stride `patch_size`: per stage a stride-2 and a stride-1 3x3 convolution, each with
    BatchNorm and ReLU, channels doubling from 32; a 1x1 convolution maps to the tower width. Convolutions bring
    the locality prior a randomly initialised ViT lacks, and BatchNorm adapts to the narrow intensity range of
    radiographs, so a small hybrid tower learns findings from a few thousand images (`patch_embedding="conv"`)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        layers, channels = [], in_channels
        for stage in range(patch_size.bit_length() - 1):
            width = 32 * 2**stage
            for stride, source in ((2, channels), (1, width)):
                layers += [nn.Conv2d(source, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        super().__init__(*layers, nn.Conv2d(channels, hidden_size, 1))


class AnatomyVisionEmbeddings(nn.Module):
    """Patch embedding + [CLS] + learned position embeddings (ViT / DINOv2 layout)."""

    def __init__(self, vision_config, patch_embedding: str = "linear"):
        super().__init__()
        hidden = vision_config.hidden_size
        self.patch_size = vision_config.patch_size
        self.grid_size = vision_config.image_size // vision_config.patch_size
        if patch_embedding == "conv":
            self.patch_embed = ConvPatchEmbedding(vision_config.num_channels, hidden, self.patch_size)
        else:
            self.patch_embed = nn.Conv2d(vision_config.num_channels, hidden, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, N, hidden]
        if patches.shape[1] != self.grid_size**2:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} do not match the model's "
                f"{self.grid_size * self.patch_size} px input; use AnatomyVLMImageProcessor"
            )
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings


class AnatomyQueries(nn.Module):
    """One learnable token per anatomical region; row i is region `config.region_names[i]`."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(1, num_queries, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings.expand(batch_size, -1, -1)


class LayerScale(nn.Module):
    def __init__(self, hidden_size: int, init_value: float):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((hidden_size,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class AnatomyVisionAttention(nn.Module):
    def __init__(self, vision_config):
        super().__init__()
        hidden = vision_config.hidden_size
        self.num_heads = vision_config.num_attention_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=vision_config.qkv_bias)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # SDPA picks flash / memory-efficient kernels
        return self.proj(out.transpose(1, 2).reshape(batch, length, hidden))


class AnatomyVisionBlock(nn.Module):
    """Pre-norm transformer block; DINOv2 towers add LayerScale after attention and MLP."""

    def __init__(self, vision_config):
        super().__init__()
        hidden = vision_config.hidden_size
        self.norm1 = nn.LayerNorm(hidden, eps=vision_config.layer_norm_eps)
        self.attn = AnatomyVisionAttention(vision_config)
        self.norm2 = nn.LayerNorm(hidden, eps=vision_config.layer_norm_eps)
        self.fc1 = nn.Linear(hidden, _mlp_hidden_size(vision_config))
        self.act = ACT2FN[vision_config.hidden_act]
        self.fc2 = nn.Linear(_mlp_hidden_size(vision_config), hidden)
        use_layer_scale = vision_config.model_type == "dinov2"
        self.ls1 = LayerScale(hidden, vision_config.layerscale_value) if use_layer_scale else nn.Identity()
        self.ls2 = LayerScale(hidden, vision_config.layerscale_value) if use_layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.fc2(self.act(self.fc1(self.norm2(x)))))


class AnatomyVisionTransformer(nn.Module):
    """One self-attention stack over `[CLS] + patches + anatomy queries`."""

    def __init__(self, config: AnatomyVLMConfig):
        super().__init__()
        vision_config = config.vision_config
        self.embeddings = AnatomyVisionEmbeddings(vision_config, config.patch_embedding)
        self.anatomy_queries = AnatomyQueries(config.num_anatomy_queries, vision_config.hidden_size)
        self.blocks = nn.ModuleList(AnatomyVisionBlock(vision_config) for _ in range(vision_config.num_hidden_layers))
        self.norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        x = torch.cat([x, self.anatomy_queries(x.shape[0])], dim=1)  # [B, 1 + N + Q, hidden]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


class AnatomyBoxHead(nn.Module):
    """MLP from an anatomy token to its box, normalised (cx, cy, w, h) in [0, 1]."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        dims = [hidden_size] * num_layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, anatomy_tokens: torch.Tensor) -> torch.Tensor:
        x = anatomy_tokens
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x.sigmoid()


def fp32_einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """`torch.einsum` in fp32, also under autocast: the similarity logits every loss and score is made of. In bf16
    (8 mantissa bits) a cosine of 0.9 times a scale of 100 is only resolved to about 0.4 logits."""
    with torch.autocast(operands[0].device.type, enabled=False):
        return torch.einsum(equation, *(operand.float() for operand in operands))


class AnatomyVLMPreTrainedModel(PreTrainedModel):
    config_class = AnatomyVLMConfig
    config: AnatomyVLMConfig
    base_model_prefix = "anatomy_vlm"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["AnatomyVisionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, AnatomyVisionEmbeddings):
            nn.init.trunc_normal_(module.cls_token, std=std)
            nn.init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, AnatomyQueries):
            nn.init.trunc_normal_(module.embeddings, std=std)
        elif isinstance(module, LayerScale):
            module.lambda1.fill_(self.config.vision_config.layerscale_value)
        elif isinstance(module, AnatomyVLMModel):
            module.logit_scale_global.fill_(self.config.logit_scale_init_value)
            module.logit_bias_global.fill_(self.config.global_logit_bias_init_value)
            module.logit_scale_fine.fill_(self.config.logit_scale_init_value)
        elif isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()


class AnatomyVLMModel(CalibratedModelMixin, AnatomyVLMPreTrainedModel):
    """
    Anatomy-VLM: detection of the configured anatomical regions, region and image embeddings, and zero-shot
    region-wise finding scores against a frozen text encoder.

    A fresh model (`AnatomyVLMModel(config)`) has random weights everywhere; `from_encoders` loads the pretrained
    text encoder (and optionally a ViT / DINOv2 checkpoint into the vision tower). `from_pretrained` restores a
    saved Anatomy-VLM checkpoint, text tower included.
    """

    def __init__(self, config: AnatomyVLMConfig):
        super().__init__(config)
        hidden = config.vision_config.hidden_size
        self.vision_model = AnatomyVisionTransformer(config)
        self.box_head = AnatomyBoxHead(hidden, config.box_head_layers)
        image_features = hidden if config.embedding_pooling == "paper" else 2 * hidden  # [CLS] (+ max of patches)
        self.visual_projection = nn.Linear(image_features, config.projection_dim, bias=False)
        self.region_projection = nn.Linear(2 * hidden, config.projection_dim, bias=False)
        self.text_model = build_text_tower(config.text_config)
        self.text_model.requires_grad_(False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale_global = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias_global = nn.Parameter(torch.tensor(config.global_logit_bias_init_value))
        self.logit_scale_fine = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # Frozen-tower outputs between calls; its budget is `prompt_memo.max_bytes` (see prompt_memo_anatomy_vlm).
        self.prompt_memo = PromptMemo()
        self._checkpoint_prompts_read = False  # prompt_embeds.safetensors is looked for on first use
        # Saved in config.json: `pipeline(task, model=<checkpoint>, trust_remote_code=True)` finds its class there.
        self.config.custom_pipelines = custom_pipelines()
        self.post_init()

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_encoders(cls, config: AnatomyVLMConfig, vision_model_name_or_path: str | None = None):
        """A new model with the pretrained text encoder of `config.text_model_name_or_path` and, optionally,
        a ViT / DINOv2 checkpoint (local folder or Hub id, e.g. RAD-DINO) in the vision tower."""
        model = cls(config)
        model.load_text_encoder()
        if vision_model_name_or_path is not None:
            model.load_vision_encoder(vision_model_name_or_path)
        return model

    def load_text_encoder(self, name_or_path: str | None = None):
        """Copy pretrained weights into the frozen text tower (default: `config.text_model_name_or_path`, read with
        `config.text_trust_remote_code`); see `text_encoder_anatomy_vlm.load_text_tower_weights`."""
        load_text_tower_weights(
            self.text_model, name_or_path or self.config.text_model_name_or_path, self.config.text_trust_remote_code
        )
        self.text_model.requires_grad_(False)
        self.prompt_memo.clear()  # outputs of the previous tower

    def load_vision_encoder(self, name_or_path: str):
        """Copy a ViT or DINOv2 checkpoint into the vision tower, interpolating position embeddings to the
        configured grid. Anatomy queries and heads keep their initialisation."""
        if self.config.patch_embedding != "linear":
            raise ValueError(
                f"cannot load {name_or_path}: ViT / DINOv2 checkpoints have a linear patch embedding but this model's "
                f"patch_embedding is {self.config.patch_embedding!r}; set patch_embedding: linear to start from a checkpoint"
            )
        source = AutoModel.from_pretrained(name_or_path)
        if source.config.model_type != self.config.vision_config.model_type:
            raise ValueError(
                f"{name_or_path} is a {source.config.model_type!r} model but vision_config is "
                f"{self.config.vision_config.model_type!r}; build the config from that checkpoint's config"
            )
        state = _vision_state_from_hf(source.state_dict(), self.config.vision_config.num_hidden_layers, name_or_path)
        state["embeddings.position_embeddings"] = interpolate_position_embeddings(
            state["embeddings.position_embeddings"], self.vision_model.embeddings.grid_size
        )
        own = self.vision_model.state_dict()
        not_found = sorted(set(own) - set(state) - {"anatomy_queries.embeddings"})
        if not_found:
            raise ValueError(f"{name_or_path}: no weights found for {not_found[:5]} (not a ViT / DINOv2 checkpoint?)")
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"{name_or_path}: weight {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
        self.vision_model.load_state_dict(state, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_model.eval()  # frozen: no dropout, so cached text embeddings equal live ones
        return self

    # ----------------------------------------------------------------------------------------------- features
    def encode_image(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the vision tower once and return boxes, normalised image and region embeddings and hidden states.

        With `embedding_pooling="box"`, a region embedding joins its anatomy token with the mean of the patch tokens
        inside the region's predicted box (`box_pooling_weights`), so it carries what that region looks like in this
        image, not only which region it is; the image embedding joins [CLS] with the element-wise max over all patch
        tokens: a finding that fills a few patches (a tube, a nodule, a curved spine) survives a max but is diluted
        in a mean. With `"paper"`: anatomy token + the mean of all patch tokens, and [CLS] alone.
        """
        hidden = self.vision_model(pixel_values)  # [B, 1 + N + Q, hidden]
        num_queries = self.config.num_anatomy_queries
        cls_token, patch_tokens, anatomy_tokens = hidden[:, 0], hidden[:, 1:-num_queries], hidden[:, -num_queries:]
        pred_boxes = self.box_head(anatomy_tokens)
        # Detached: where the boxes go is the detection loss's business, not the alignment losses'.
        if self.config.embedding_pooling == "paper":
            region_patches = patch_tokens.mean(dim=1, keepdim=True).expand_as(anatomy_tokens)  # [B, Q, hidden]
            image_features = cls_token
        else:
            weights = box_pooling_weights(pred_boxes.detach(), self.vision_model.embeddings.grid_size)  # [B, Q, N]
            region_patches = weights.to(patch_tokens.dtype) @ patch_tokens  # [B, Q, hidden]
            image_features = torch.cat([cls_token, patch_tokens.amax(dim=1)], dim=-1)
        region_embeds = self.region_projection(torch.cat([anatomy_tokens, region_patches], dim=-1))
        image_embeds = self.visual_projection(image_features)
        return {
            "pred_boxes": pred_boxes,
            "image_embeds": F.normalize(image_embeds, dim=-1),
            "region_embeds": F.normalize(region_embeds, dim=-1),
            "last_hidden_state": hidden,
        }

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, D]` L2-normalised global embeddings."""
        return self.encode_image(pixel_values)["image_embeds"]

    def get_region_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, Q, D]` L2-normalised region embeddings, row i = `config.region_names[i]`."""
        return self.encode_image(pixel_values)["region_embeds"]

    @torch.no_grad()
    def get_text_tower_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[T, text_hidden]` pooled outputs of the frozen text tower: what the text-embedding cache stores."""
        return text_tower_embeds(self.text_model, input_ids, attention_mask, self.config.text_pooling)

    def project_text(self, text_tower_embeds: torch.Tensor) -> torch.Tensor:
        """`[T, D]` L2-normalised joint-space embeddings from frozen text-tower outputs."""
        return F.normalize(self.text_projection(text_tower_embeds.to(self.text_projection.weight.dtype)), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[T, D]` L2-normalised text embeddings."""
        return self.project_text(self.get_text_tower_embeds(input_ids, attention_mask))

    @staticmethod
    def ensemble_prompts(embeds: torch.Tensor) -> torch.Tensor:
        """`[..., K, D]` normalised embeddings of one prompt in K wordings -> `[..., D]`: their renormalised mean (one
        wording: itself). The one prompt-ensembling rule: training (`forward`) and zero-shot scoring (`prompt_embeds`)
        both use it."""
        if embeds.shape[-2] == 1:
            return embeds[..., 0, :]
        return F.normalize(embeds.mean(-2), dim=-1)

    def _text_embeds(self, input_ids, attention_mask, tower_embeds, name):
        if tower_embeds is None and input_ids is None:
            return None
        if tower_embeds is None:
            tower_embeds = self.get_text_tower_embeds(input_ids, attention_mask)
        elif input_ids is not None:
            raise ValueError(f"give either {name}_input_ids or {name}_text_embeds, not both")
        if tower_embeds.dim() == 3:  # [F, K, text_hidden]: K template wordings of each finding
            return self.ensemble_prompts(self.project_text(tower_embeds))
        return self.project_text(tower_embeds)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        finding_labels: torch.Tensor | None = None,
        finding_input_ids: torch.Tensor | None = None,
        finding_attention_mask: torch.Tensor | None = None,
        finding_text_embeds: torch.Tensor | None = None,
        phrase_input_ids: torch.Tensor | None = None,
        phrase_attention_mask: torch.Tensor | None = None,
        phrase_text_embeds: torch.Tensor | None = None,
        phrase_positive_mask: torch.Tensor | None = None,
        phrase_negative_mask: torch.Tensor | None = None,
        phrase_ids: torch.Tensor | None = None,
        region_prompt_text_embeds: torch.Tensor | None = None,
        region_labels: torch.Tensor | None = None,
        loss_weights: dict[str, float] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AnatomyVLMOutput | tuple:
        r"""
        Args:
            pixel_values (`[B, C, S, S]`): from `AnatomyVLMImageProcessor`.
            boxes (`[B, Q, 4]`, *optional*): true normalised (cx, cy, w, h); with `box_mask` (`[B, Q]` bool)
                gives `loss_anatomy`.
            finding_labels (`[B, F]`, *optional*): 1 present / 0 absent / -1 unknown for F finding texts given as
                `finding_input_ids` + `finding_attention_mask` (`[F, L]`) or as cached frozen-tower outputs
                `finding_text_embeds` (`[F, text_hidden]`, or `[F, K, text_hidden]` for K template wordings,
                ensembled by `ensemble_prompts`); gives `loss_global`.
            phrase_positive_mask (`[B, Q, T]` bool, *optional*): region-phrase positives for T phrase texts given
                as `phrase_input_ids` + `phrase_attention_mask` or `phrase_text_embeds`; `phrase_negative_mask`
                (same shape; default: all non-positives) and `phrase_ids` (`[T]`, equal ids = identical texts)
                refine the negatives; gives `loss_fine`.
            region_prompt_text_embeds (`[2, Q, F, text_hidden]` or `[2, Q, F, K, text_hidden]`, *optional*): cached
                frozen-tower outputs of the prompt pairs "<finding> in the <region>" / "no <finding> in the <region>"
                (in K template wordings, ensembled by `ensemble_prompts`); with `region_labels`
                (`[B, Q, F]`, 1 / 0 / -1 unknown) gives `loss_region`: a sigmoid loss on the pair's log-odds, the
                very score `interpret` reports per region.
            loss_weights (`dict[str, float]`, *optional*): weight of each term in `loss`, by name ("anatomy",
                "global", "fine", "region"); a term left out of the dict is left out of `loss` (still returned as
                `loss_<name>`), as in a training stage's `loss_weights`, and `loss` is None when no computed term
                is in the dict. Default: every computed term weight 1.0.
            input_ids, attention_mask (`[T, L]`, *optional*): T texts, used as given (no prompt templates), as in
                CLIP's `forward`: gives `logits_per_image` (`[B, T]`, the image-vs-text logits of `global_logits`)
                and `logits_per_text`.
        """
        if loss_weights is not None and not set(loss_weights) <= set(LOSS_TERMS):
            unknown = sorted(set(loss_weights) - set(LOSS_TERMS))
            raise ValueError(f"loss_weights: unknown terms {unknown}; the terms are {LOSS_TERMS}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features = self.encode_image(pixel_values)
        output = AnatomyVLMOutput(**features)
        losses = {}

        if boxes is not None:
            if box_mask is None:
                box_mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
            losses["anatomy"], _, _ = detection_loss(
                features["pred_boxes"], boxes, box_mask, self.config.bbox_l1_weight, self.config.bbox_giou_weight
            )

        finding_embeds = self._text_embeds(finding_input_ids, finding_attention_mask, finding_text_embeds, "finding")
        if finding_embeds is not None:
            output.global_logits = self.global_logits(features["image_embeds"], finding_embeds)
            if finding_labels is not None:
                losses["global"] = global_finding_loss(output.global_logits, finding_labels)

        text_embeds = self._text_embeds(input_ids, attention_mask, None, "")
        if text_embeds is not None:
            output.logits_per_image = self.global_logits(features["image_embeds"], text_embeds)
            output.logits_per_text = output.logits_per_image.T

        phrase_embeds = self._text_embeds(phrase_input_ids, phrase_attention_mask, phrase_text_embeds, "phrase")
        if phrase_embeds is not None:
            output.region_logits = self.region_logits(features["region_embeds"], phrase_embeds)
            if phrase_positive_mask is not None:
                losses["fine"] = region_phrase_contrastive_loss(
                    output.region_logits, phrase_positive_mask, phrase_negative_mask, phrase_ids,
                    direction=self.config.fine_loss_direction,
                )

        if region_prompt_text_embeds is not None and region_labels is not None:
            pair_embeds = self.project_text(region_prompt_text_embeds)
            if pair_embeds.dim() == 5:
                pair_embeds = self.ensemble_prompts(pair_embeds)
            pair_logits = self.region_pair_logits(features["region_embeds"], pair_embeds)
            log_odds = pair_logits[..., 0] - pair_logits[..., 1]  # softmax over the pair = sigmoid of this
            losses["region"] = global_finding_loss(log_odds.flatten(1), region_labels.flatten(1))

        for name, value in losses.items():
            setattr(output, f"loss_{name}", value)
        weights = dict.fromkeys(losses, 1.0) if loss_weights is None else loss_weights
        weighted = [weights[name] * value for name, value in losses.items() if name in weights]
        if weighted:
            output.loss = sum(weighted)
        return output if return_dict else output.to_tuple()

    def global_logits(self, image_embeds: torch.Tensor, finding_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, F]` sigmoid logits of each finding for each image."""
        scale = self.logit_scale_global.clamp(max=math.log(100)).exp()
        return scale * fp32_einsum("bd,fd->bf", image_embeds, finding_embeds) + self.logit_bias_global

    def region_pair_logits(self, region_embeds: torch.Tensor, pair_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, Q, F, 2]` logits of each region against its own prompt pair `pair_embeds` `[2, Q, F, D]`
        ("<finding> in the <region>", "no <finding> in the <region>"): what training and `zero_shot_scores` share."""
        scale = self.logit_scale_fine.clamp(max=math.log(100)).exp()
        return scale * fp32_einsum("bqd,pqfd->bqfp", region_embeds, pair_embeds)

    def region_logits(self, region_embeds: torch.Tensor, phrase_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, Q, T]` contrastive logits of each phrase for each region."""
        scale = self.logit_scale_fine.clamp(max=math.log(100)).exp()
        return scale * fp32_einsum("bqd,td->bqt", region_embeds, phrase_embeds)

    # ----------------------------------------------------------------------------------------------- zero-shot
    @torch.no_grad()
    def embed_texts(self, texts: list[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
        """`[T, D]` joint-space embeddings of `texts`; frozen-tower outputs come from `text_tower_outputs`."""
        device = self.text_projection.weight.device
        if not texts:
            return torch.empty(0, self.config.projection_dim, device=device)
        tower = self.text_tower_outputs(texts, tokenizer, batch_size)
        return self.project_text(torch.stack([tower[t] for t in texts]).to(device))

    @torch.no_grad()
    def text_tower_outputs(self, texts: list[str], tokenizer, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Each distinct text of `texts` -> its float32 CPU frozen-tower output `[text_hidden]`.

        Looked up in `prompt_memo` first: the checkpoint's precomputed prompts (`save_prompt_embeds`, read on the first
        call when this text encoder made them) and the most recent other texts within `prompt_memo.max_bytes`. Only
        texts found in neither go through the tower, in batches of `batch_size`, and are memoised.
        """
        if not self._checkpoint_prompts_read:
            self._pin_checkpoint_prompts(tokenizer)
        outputs = self.prompt_memo.lookup(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in outputs]
        device = next(self.text_model.parameters()).device  # the trainer keeps the frozen tower in host memory
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            tokens = tokenizer(
                chunk, padding=True, truncation=True, max_length=self.config.max_text_length, return_tensors="pt"
            ).to(device)
            embeds = self.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"]).float().cpu()
            self.prompt_memo.store(chunk, embeds)
            outputs.update(zip(chunk, embeds))
        return outputs

    def text_encoder_fingerprint(self, tokenizer) -> str:
        """What precomputed tower outputs are valid for: this tower's weights, `tokenizer`, pooling and max length."""
        return text_encoder_fingerprint(
            self.text_model.state_dict(), tokenizer, self.config.text_pooling, self.config.max_text_length
        )

    def _pin_checkpoint_prompts(self, tokenizer):
        """Pin the prompt embeddings the checkpoint ships (`prompt_embeds.safetensors`) when this encoder made them.
        Two threads arriving here at once both read the file: harmless, the result is the same."""
        path = checkpoint_file(self.config.name_or_path, PROMPT_EMBEDS_NAME)
        embeds = read_prompt_embeds(path, self.text_encoder_fingerprint(tokenizer)) if path else None
        if embeds is not None:
            self.prompt_memo.pin(embeds)
        self._checkpoint_prompts_read = True

    @torch.no_grad()
    def save_prompt_embeds(self, save_directory, processor, tower_outputs: dict[str, torch.Tensor] | None = None) -> str:
        """Write the frozen tower's outputs for every prompt of the default findings (`config.findings`) to
        `save_directory/prompt_embeds.safetensors` with this text encoder's fingerprint; returns its path.

        A model loaded from that folder (also through `trust_remote_code`) scores its default findings without
        running the text tower: its first `interpret` does not embed the ~1,500 default prompts. `processor` (or its
        tokenizer) must be the one `interpret` will be given, or the file is ignored. `tower_outputs` (text -> output,
        e.g. from a training run's text cache made by this encoder) saves embedding those texts again.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        texts = list(dict.fromkeys(text for group in self.prompt_groups(self.config.findings) for text in group))
        known = {text: tower_outputs[text] for text in texts if text in (tower_outputs or {})}
        known.update(self.text_tower_outputs([text for text in texts if text not in known], tokenizer))
        embeds = {text: known[text] for text in texts}
        path = os.path.join(save_directory, PROMPT_EMBEDS_NAME)
        write_prompt_embeds(path, embeds, self.text_encoder_fingerprint(tokenizer))
        self.prompt_memo.pin(embeds)
        return path

    def prompt_groups(self, findings: list[str], templates: dict | None = None) -> list[list[str]]:
        """The prompts of `findings`, one group per ensembled embedding, one text per template: F global groups,
        then Q x F positive and Q x F negated region groups (region-major, findings inner).

        `templates`: other wordings, ``{"global": [...], "region": [...], "region_negated": [...]}`` (each key
        optional; the config's templates otherwise), e.g. to score prompts worded unlike any training text."""
        config, templates = self.config, templates or {}
        global_templates = templates.get("global", config.global_prompt_templates)
        groups = [[t.format(finding=f) for t in global_templates] for f in findings]
        for templates_of in (templates.get("region", config.region_prompt_templates),
                             templates.get("region_negated", config.region_negated_prompt_templates)):
            groups += [[t.format(finding=f, region=r) for t in templates_of] for r in config.region_names for f in findings]
        return groups

    def prompt_embeds(self, findings: list[str], tokenizer, templates: dict | None = None) -> dict[str, torch.Tensor]:
        """Ensembled zero-shot prompt embeddings: `global` `[F, D]` and `pairs` `[2, Q, F, D]` (positive, negated).

        Each embedding is the renormalised mean over the templates (the config's, or `templates` as in
        `prompt_groups`) of the normalised prompt embeddings. Prompts not in `prompt_memo` go through the text tower
        in one batched pass.
        """
        groups = self.prompt_groups(findings, templates)
        embeds = self.embed_texts([text for group in groups for text in group], tokenizer)
        sizes = [len(group) for group in groups]
        ensembled = torch.stack([self.ensemble_prompts(chunk) for chunk in embeds.split(sizes)])
        num_findings, num_regions = len(findings), len(self.config.region_names)
        return {
            "global": ensembled[:num_findings],
            "pairs": ensembled[num_findings:].reshape(2, num_regions, num_findings, -1),
        }

    @torch.no_grad()
    def zero_shot_scores(self, pixel_values: torch.Tensor, prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        Region and image scores of a batch against `prompt_embeds(...)`.

        Returns `pred_boxes` `[B, Q, 4]` (normalised cx, cy, w, h), `region_scores` `[B, Q, F]` (softmax over the
        prompt pair "<finding> in the <region>" / "no <finding> in the <region>") and `global_scores` `[B, F]`
        (sigmoid of the image-vs-finding logit); the logits under them, `region_log_odds` `[B, Q, F]` and
        `global_logits` `[B, F]` (what calibration scales), `image_embeds` `[B, D]` and `region_embeds` `[B, Q, D]`
        (to score other prompts with `score_embeddings` without encoding the images again).
        """
        features = self.encode_image(pixel_values.to(self.text_projection.weight.device, self.text_projection.weight.dtype))
        return {"pred_boxes": features["pred_boxes"],
                **self.score_embeddings(features["image_embeds"], features["region_embeds"], prompts),
                "image_embeds": features["image_embeds"], "region_embeds": features["region_embeds"]}

    def score_embeddings(self, image_embeds: torch.Tensor, region_embeds: torch.Tensor,
                         prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`region_scores`, `global_scores`, `region_log_odds` and `global_logits` (as in `zero_shot_scores`) of
        already encoded images against `prompt_embeds(...)`: other prompts for the same images cost no forward pass."""
        pair_logits = self.region_pair_logits(region_embeds, prompts["pairs"])
        global_logits = self.global_logits(image_embeds, prompts["global"])
        return {"region_scores": pair_logits.softmax(-1)[..., 0], "global_scores": global_logits.sigmoid(),
                "region_log_odds": pair_logits[..., 0] - pair_logits[..., 1], "global_logits": global_logits}

    @torch.no_grad()
    def interpret(self, images, processor, findings=None, batch_size: int = 8) -> list[dict]:
        """
        Zero-shot, anatomy-wise interpretation.

        Args:
            images: a PIL image, numpy array or path (PNG, JPEG, DICOM), or a list of them.
            processor: the checkpoint's `AnatomyVLMProcessor`.
            findings: finding texts to score (any free text); default `config.findings`.

        Returns:
            One dict per image: `{"image_size": [W, H], "regions": [{"name", "box": [x1, y1, x2, y2] in original
            pixels, "scores": {finding: probability}}, ...], "findings": {finding: probability}}`. A region score
            is the softmax over the prompt pair "<finding> in the <region>" / "no <finding> in the <region>";
            a global score is the sigmoid of the image-vs-finding logit.

            A checkpoint with `calibration.safetensors` (`model.calibration`, see `calibration_anatomy_vlm`) gives
            calibrated probabilities instead: each head's logits Platt-scaled as fitted on its validation split (the
            phantom validation split for the quickstart model, so calibrated for phantoms, not for real films);
            and each dict gets `"ood": {"score", "threshold", "warning": score > threshold}`, a warning that the
            image is unlike the training images (its scores then mean little). Without the file: no `"ood"`.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        findings = list(self.config.findings if findings is None else findings)
        if not findings or any(not isinstance(f, str) or not f.strip() for f in findings):
            raise ValueError(f"interpret: findings must be a non-empty list of non-empty strings, got {findings!r}")
        was_training = self.training
        self.eval()
        prompts = self.prompt_embeds(findings, processor.tokenizer)
        results = []
        for start in range(0, len(images), batch_size):
            inputs = processor(images=images[start : start + batch_size], return_tensors="pt")
            scores = self.zero_shot_scores(inputs["pixel_values"], prompts)
            boxes = processor.post_process_boxes(scores["pred_boxes"], inputs["original_sizes"])
            region_scores, global_scores, ood = scores["region_scores"], scores["global_scores"], None
            if self.calibration is not None:
                region_scores = self.calibration.region_platt(scores["region_log_odds"])
                global_scores = self.calibration.global_platt(scores["global_logits"])
                ood = self.calibration.ood_results(scores["image_embeds"], inputs["pixel_values"],
                                                   inputs["original_sizes"], processor.image_processor)
            for i, (height, width) in enumerate(inputs["original_sizes"].tolist()):
                result = {
                    "image_size": [width, height],
                    "regions": [
                        {
                            "name": name,
                            "box": [round(v, 2) for v in boxes[i, q].tolist()],
                            "scores": dict(zip(findings, region_scores[i, q].tolist())),
                        }
                        for q, name in enumerate(self.config.region_names)
                    ],
                    "findings": dict(zip(findings, global_scores[i].tolist())),
                }
                if ood is not None:
                    result["ood"] = ood[i]
                results.append(result)
        self.train(was_training)
        return results


def box_pooling_weights(boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """`[B, Q, g*g]` weights (rows sum to 1): the fraction of each patch covered by each (cx, cy, w, h) box.

    A box smaller than a patch still pools the patch(es) it lies in; a box with no area pools nothing.
    """
    edges = torch.arange(grid_size, device=boxes.device, dtype=torch.float32) / grid_size  # left / top patch edges
    cx, cy, w, h = boxes.float().unbind(-1)  # [B, Q]

    def overlap(low, high):  # [B, Q, g]: covered fraction of each patch interval
        return ((torch.minimum(high[..., None], edges + 1 / grid_size) - torch.maximum(low[..., None], edges))
                .clamp(min=0) * grid_size)

    weights = (overlap(cy - h / 2, cy + h / 2)[..., :, None] * overlap(cx - w / 2, cx + w / 2)[..., None, :]).flatten(-2)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)


def interpolate_position_embeddings(position_embeddings: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize `[1, 1 + g*g, D]` position embeddings ([CLS] first) to a `grid_size` x `grid_size` patch grid."""
    cls_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position embeddings of {patch_pos.shape[1]} patches do not form a square grid")
    if old == grid_size:
        return position_embeddings
    grid = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, -1).to(position_embeddings.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# Per-layer modules of transformers' ViT and DINOv2 (current and older names) -> ours; q/k/v are fused into qkv.
_LAYER_KEYS = {
    "layernorm_before": "norm1",
    "norm1": "norm1",
    "layernorm_after": "norm2",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "fc1",
    "intermediate.dense": "fc1",
    "mlp.fc2": "fc2",
    "output.dense": "fc2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_QKV_KEYS = (
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
)
_LAYER_PARAM = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _vision_state_from_hf(source: dict[str, torch.Tensor], num_layers: int, name: str) -> dict[str, torch.Tensor]:
    """Rename a transformers ViTModel / Dinov2Model state dict to `AnatomyVisionTransformer` names."""
    state = {
        "embeddings.cls_token": source["embeddings.cls_token"],
        "embeddings.position_embeddings": source["embeddings.position_embeddings"],
        "embeddings.patch_embed.weight": source["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embed.bias": source["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": source["layernorm.weight"],
        "norm.bias": source["layernorm.bias"],
    }
    qkv = {}  # (layer, param) -> [q, k, v]
    for key, value in source.items():
        match = _LAYER_PARAM.match(key)
        if match is None:
            continue
        layer, module, param = int(match[1]), match[2], match[3]
        if module in _LAYER_KEYS:
            state[f"blocks.{layer}.{_LAYER_KEYS[module]}.{param}"] = value
        for slot, names in enumerate(_QKV_KEYS):
            if module in names:
                qkv.setdefault((layer, param), [None] * 3)[slot] = value
    layers = {layer for layer, _ in qkv}
    if len(layers) != num_layers:
        raise ValueError(f"{name} has {len(layers)} transformer layers, vision_config expects {num_layers}")
    for (layer, param), parts in qkv.items():
        if any(part is None for part in parts):
            raise ValueError(f"{name}: layer {layer} lacks one of its query/key/value {param}s")
        state[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return state
