"""transformers pipelines of Anatomy-VLM, registered in every checkpoint under standard task names.

`AnatomyVLMModel` writes `custom_pipelines()` into its config, so a saved checkpoint (this file ships with it)
serves `pipeline(task, model=checkpoint, trust_remote_code=True)` where this project is not installed:

* `zero-shot-image-classification`: `[{"score", "label"}]`, highest score first = `interpret(...)["findings"]`;
* `zero-shot-object-detection`: `[{"score", "label", "region", "box": {"xmin", "ymin", "xmax", "ymax"}}]`,
  highest score first = `interpret(...)["regions"]`;
* `image-feature-extraction`: the image embedding `[1, D]` (`get_image_features`); with `regions=True` also the
  region embeddings (`get_region_features`).

Why these are custom classes rather than transformers' own pipelines for those tasks:

* Image findings are independent: a score is the sigmoid of the image-vs-finding logit, and several findings can
  be present at once. transformers' zero-shot image classification takes a softmax over the candidate labels
  (only SigLIP models get a sigmoid), so its scores sum to 1 and cannot equal ours for any logits. It also
  formats each label with one `hypothesis_template`, while our prompts average the config's templates.
* An anatomy-wise score is a (finding, region) pair scored by the softmax over the prompt pair "<finding> in the
  <region>" / "no <finding> in the <region>", the box being the region's predicted box. That fits the semantics
  of zero-shot object detection (a labelled box with a score, boxes in original pixels), so the task name and
  its call (`candidate_labels`, `threshold`, `top_k`) are kept; but transformers' own pipeline scores one text per
  box through `image_processor.post_process_object_detection` and truncates boxes to whole pixels. Ours adds the
  box's `region` to each result and keeps boxes as `interpret` gives them (floats, 0.01 px).
* transformers' image feature extraction returns the model's first output (our boxes) or a `pooler_output`.
* transformers' pipelines open images with `load_image`, which converts to 8-bit RGB and cannot read DICOM; ours
  hand the input (path, PIL image, array) to the checkpoint's processor, as `interpret` does, so a 16-bit PNG or
  a DICOM file gets the same pixels through either.

The two zero-shot pipelines run `interpret` itself and reshape its result, so their numbers are `interpret`'s by
construction, whatever scoring `interpret` does now or later.
"""

from transformers import Pipeline

MODULE = "pipeline_anatomy_vlm"  # the file name inside a checkpoint, what `custom_pipelines` entries point at


def custom_pipelines() -> dict:
    """The `custom_pipelines` entry of a checkpoint's config: task -> class in this file and the Auto class that
    loads the model. A new dict each call: transformers' `pipeline()` rewrites the entry it uses in place."""
    classes = {
        "zero-shot-image-classification": AnatomyVLMZeroShotImageClassificationPipeline,
        "zero-shot-object-detection": AnatomyVLMZeroShotObjectDetectionPipeline,
        "image-feature-extraction": AnatomyVLMImageFeatureExtractionPipeline,
    }
    return {task: {"impl": f"{MODULE}.{cls.__name__}", "pt": ["AutoModel"], "type": cls.input_type}
            for task, cls in classes.items()}


def _findings(candidate_labels):
    """`candidate_labels` as `interpret`'s `findings` (None: `config.findings`); one string is one label."""
    return [candidate_labels] if isinstance(candidate_labels, str) else candidate_labels


class _AnatomyVLMPipeline(Pipeline):
    """Works with the checkpoint's `AnatomyVLMProcessor` (its image processor and tokenizer); images go to it as
    they are (path, PIL image, array), as in `interpret`."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    input_type = "image"


class _AnatomyVLMZeroShotPipeline(_AnatomyVLMPipeline):
    """Runs `AnatomyVLMModel.interpret` on the image and reshapes its result: one scoring path, so the numbers are
    `interpret`'s, whatever scoring it does."""

    input_type = "multimodal"

    def __call__(self, image, candidate_labels=None, **kwargs):
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def preprocess(self, image, candidate_labels=None):
        return {"image": image, "findings": _findings(candidate_labels)}

    def _forward(self, inputs):
        return self.model.interpret(inputs["image"], self.processor, findings=inputs["findings"])[0]


class AnatomyVLMZeroShotImageClassificationPipeline(_AnatomyVLMZeroShotPipeline):
    """
    Image-level zero-shot finding scores: `classifier(image, candidate_labels=[...])` returns
    `[{"score": p, "label": finding}, ...]`, highest first: `interpret(...)["findings"]`, where p is the sigmoid of
    the image-vs-finding logit, each finding on its own (they do not sum to 1). `candidate_labels` default to
    `config.findings`; each is put in the config's `global_prompt_templates`.
    """

    def _sanitize_parameters(self, candidate_labels=None):
        return {"candidate_labels": candidate_labels}, {}, {}

    def postprocess(self, result):
        return sorted(({"score": score, "label": label} for label, score in result["findings"].items()),
                      key=lambda item: -item["score"])


class AnatomyVLMZeroShotObjectDetectionPipeline(_AnatomyVLMZeroShotPipeline):
    """
    Anatomy-wise zero-shot finding scores: `detector(image, candidate_labels=[...], threshold=0.1, top_k=None)`
    returns one result per (region, finding) pair scoring at least `threshold`, highest first:
    `{"score": p, "label": finding, "region": name, "box": {"xmin", "ymin", "xmax", "ymax"}}`, the box in original
    pixels (floats, 0.01 px): `interpret(...)["regions"]`, where p is the softmax over "<finding> in the <region>" /
    "no <finding> in the <region>". `threshold=0` returns every pair.
    """

    def _sanitize_parameters(self, candidate_labels=None, threshold=None, top_k=None):
        postprocess = {key: value for key, value in (("threshold", threshold), ("top_k", top_k)) if value is not None}
        return {"candidate_labels": candidate_labels}, {}, postprocess

    def postprocess(self, result, threshold: float = 0.1, top_k: int | None = None):
        detections = [
            {"score": score, "label": label, "region": region["name"],
             "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), region["box"]))}
            for region in result["regions"]
            for label, score in region["scores"].items()
            if score >= threshold
        ]
        detections.sort(key=lambda item: -item["score"])
        return detections[:top_k] if top_k else detections


class AnatomyVLMImageFeatureExtractionPipeline(_AnatomyVLMPipeline):
    """
    `extractor(image)` returns the L2-normalised image embedding `[1, D]` (nested lists; a tensor with
    `return_tensors=True`), as `get_image_features` gives it. With `regions=True`: `{"image_embeds": [1, D],
    "region_embeds": [1, Q, D], "region_names": [...]}`, region i being `config.region_names[i]`.
    """

    def _sanitize_parameters(self, regions=None, return_tensors=None):
        postprocess = {key: value for key, value in (("regions", regions), ("return_tensors", return_tensors))
                       if value is not None}
        return {}, {}, postprocess

    def preprocess(self, image):
        return dict(self.image_processor(image))  # pixel_values [1, C, S, S], original_sizes [1, 2]

    def _forward(self, inputs):
        features = self.model.encode_image(inputs["pixel_values"].to(self.model.dtype))
        return {"image_embeds": features["image_embeds"], "region_embeds": features["region_embeds"]}

    def postprocess(self, outputs, regions: bool = False, return_tensors: bool = False):
        def convert(tensor):
            return tensor if return_tensors else tensor.tolist()

        if not regions:
            return convert(outputs["image_embeds"])
        return {"image_embeds": convert(outputs["image_embeds"]), "region_embeds": convert(outputs["region_embeds"]),
                "region_names": list(self.model.config.region_names)}
