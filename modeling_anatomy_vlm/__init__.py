"""Anatomy-VLM: the files that ship with a checkpoint (config, model, image processor, processor)."""

from .configuration_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS, AnatomyVLMConfig
from .image_processing_anatomy_vlm import AnatomyVLMImageProcessor, ImageLoadError
from .modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMOutput
from .modeling_anatomy_vlm_segmentation import AnatomyVLMForSemanticSegmentation, AnatomyVLMSemanticSegmenterOutput
from .processing_anatomy_vlm import AnatomyVLMProcessor

# save_pretrained writes `auto_map` and copies these files, so trust_remote_code loading needs no install.
AnatomyVLMConfig.register_for_auto_class()
AnatomyVLMModel.register_for_auto_class("AutoModel")
AnatomyVLMForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
AnatomyVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
AnatomyVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ANATOMICAL_REGIONS",
    "DEFAULT_FINDINGS",
    "AnatomyVLMConfig",
    "AnatomyVLMForSemanticSegmentation",
    "AnatomyVLMImageProcessor",
    "AnatomyVLMModel",
    "AnatomyVLMOutput",
    "AnatomyVLMProcessor",
    "AnatomyVLMSemanticSegmenterOutput",
    "ImageLoadError",
]
