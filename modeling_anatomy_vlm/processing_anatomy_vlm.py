"""Processor of Anatomy-VLM: the image processor, the text encoder's tokenizer, and zero-shot prompt building."""

from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_anatomy_vlm import AnatomyVLMImageProcessor
from .text_encoder_anatomy_vlm import resolve_text_encoder_path


def format_prompts(templates, finding: str, region: str | None = None) -> list[str]:
    """Fill `{finding}` (and `{region}`) into each template, e.g. "{finding} in the {region}"."""
    return [template.format(finding=finding, region=region) for template in templates]


class AnatomyVLMProcessor(ProcessorMixin):
    r"""
    Wraps an [`AnatomyVLMImageProcessor`] and the text encoder's tokenizer.

    `processor(images=..., boxes=..., text=...)` returns the image processor's outputs (`pixel_values`,
    `original_sizes`, `boxes`, `box_mask`) and the tokenizer's (`input_ids`, `attention_mask`) in one batch.
    """

    def __init__(self, image_processor, tokenizer, max_text_length: int = 64, **kwargs):
        self.max_text_length = max_text_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config, **image_processor_kwargs) -> "AnatomyVLMProcessor":
        """A processor matching a fresh model: input size from `vision_config`, tokenizer from the text encoder;
        `image_processor_kwargs` (e.g. `image_mean`, `image_std`) go to `AnatomyVLMImageProcessor`."""
        image_processor = AnatomyVLMImageProcessor(
            size=config.vision_config.image_size, num_channels=config.vision_config.num_channels,
            **image_processor_kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_text_encoder_path(config.text_model_name_or_path), trust_remote_code=config.text_trust_remote_code
        )
        return cls(image_processor, tokenizer, max_text_length=config.max_text_length)

    def __call__(self, images=None, text=None, boxes=None, return_tensors: str = "pt", **kwargs):
        if images is None and text is None:
            raise ValueError("AnatomyVLMProcessor: give images, text, or both")
        encoding = {}
        if images is not None:
            encoding.update(self.image_processor(images, boxes=boxes))
        if text is not None:
            encoding.update(self.tokenize(text, return_tensors=return_tensors))
        return BatchFeature(data=encoding)

    def tokenize(self, text, return_tensors: str = "pt"):
        return self.tokenizer(
            text, padding=True, truncation=True, max_length=self.max_text_length, return_tensors=return_tensors
        )

    def post_process_boxes(self, pred_boxes, original_sizes):
        """See [`AnatomyVLMImageProcessor.post_process_boxes`]."""
        return self.image_processor.post_process_boxes(pred_boxes, original_sizes)
