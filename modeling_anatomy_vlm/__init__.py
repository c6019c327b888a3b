"""Anatomy-VLM: the files that ship with a checkpoint (config, model, image processor, processor, pipelines)."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)

from .configuration_anatomy_vlm import ANATOMICAL_REGIONS, DEFAULT_FINDINGS, AnatomyVLMConfig
from .image_processing_anatomy_vlm import AnatomyVLMImageProcessor, ImageLoadError
from .modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMOutput
from .modeling_anatomy_vlm_segmentation import AnatomyVLMForSemanticSegmentation, AnatomyVLMSemanticSegmenterOutput
from .pipeline_anatomy_vlm import (
    AnatomyVLMImageFeatureExtractionPipeline,
    AnatomyVLMZeroShotImageClassificationPipeline,
    AnatomyVLMZeroShotObjectDetectionPipeline,
)
from .processing_anatomy_vlm import AnatomyVLMProcessor

# save_pretrained writes `auto_map` and copies these files, so trust_remote_code loading needs no install.
AnatomyVLMConfig.register_for_auto_class()
AnatomyVLMModel.register_for_auto_class("AutoModel")
AnatomyVLMForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
AnatomyVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
AnatomyVLMProcessor.register_for_auto_class("AutoProcessor")

# Where the project is imported, its own classes serve its checkpoints, as transformers' built-in classes do: no
# `trust_remote_code`. Without these, `AnatomyVLMProcessor.from_pretrained(dir)` refuses, because ProcessorMixin
# loads its image processor through `AutoImageProcessor`, which finds only the checkpoint's `auto_map` (remote
# code) for the class name "AnatomyVLMImageProcessor" and asks for the flag. Registered, the Auto classes pick
# these local classes before the checkpoint's copies (also with `trust_remote_code=True`). This file does not
# ship with a checkpoint, so remote code never registers anything globally.
AutoConfig.register(AnatomyVLMConfig.model_type, AnatomyVLMConfig)
AutoModel.register(AnatomyVLMConfig, AnatomyVLMModel)
AutoModelForSemanticSegmentation.register(AnatomyVLMConfig, AnatomyVLMForSemanticSegmentation)
# One class for both backends: it reads files and resizes with torch itself.
AutoImageProcessor.register(
    AnatomyVLMConfig, image_processor_classes={"pil": AnatomyVLMImageProcessor, "torchvision": AnatomyVLMImageProcessor}
)
AutoProcessor.register(AnatomyVLMConfig, AnatomyVLMProcessor)

__all__ = [
    "ANATOMICAL_REGIONS",
    "DEFAULT_FINDINGS",
    "AnatomyVLMConfig",
    "AnatomyVLMForSemanticSegmentation",
    "AnatomyVLMImageFeatureExtractionPipeline",
    "AnatomyVLMImageProcessor",
    "AnatomyVLMModel",
    "AnatomyVLMOutput",
    "AnatomyVLMProcessor",
    "AnatomyVLMSemanticSegmenterOutput",
    "AnatomyVLMZeroShotImageClassificationPipeline",
    "AnatomyVLMZeroShotObjectDetectionPipeline",
    "ImageLoadError",
]
