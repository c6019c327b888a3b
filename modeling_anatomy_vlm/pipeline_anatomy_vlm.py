"""transformers pipelines of Anatomy-VLM, registered in every checkpoint under standard task names.

`AnatomyVLMModel` writes `custom_pipelines()` into its config, so a saved checkpoint (this file ships with it)
serves `pipeline(task, model=checkpoint, trust_remote_code=True)` where this project is not installed:

| task | returns, per image | equals |
|---|---|---|
| `zero-shot-image-classification` | `[{"score", "label"}]`, highest score first | `interpret(...)["findings"]` |
| `zero-shot-object-detection` | `[{"score", "label", "region", "box": {"xmin", "ymin", "xmax", "ymax"}}]`, highest first | `interpret(...)["regions"]` |
| `image-feature-extraction` | the image embedding `[1, D]`; with `regions=True` also the region embeddings | `get_image_features`, `get_region_features` |

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
  hand the input (path, PIL image, array) to the checkpoint's image processor, as `interpret` does, so a
  16-bit PNG or a DICOM file gets the same pixels through either.
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


def _findings(candidate_labels, config) -> list[str]:
    """The findings to score: `candidate_labels` (one string or a list), default `config.findings`."""
    if candidate_labels is None:
        return list(config.findings)
    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    if not labels or any(not isinstance(label, str) or not label.strip() for label in labels):
        raise ValueError(f"candidate_labels must be a non-empty list of non-empty strings, got {candidate_labels!r}")
    return labels


class _AnatomyVLMPipeline(Pipeline):
    """Images go to the checkpoint's image processor as they are (path, PIL image, array)."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    input_type = "image"

    def preprocess(self, image):
        return dict(self.image_processor(image))  # pixel_values [1, C, S, S], original_sizes [1, 2]


class _AnatomyVLMZeroShotPipeline(_AnatomyVLMPipeline):
    """Scores `candidate_labels` (default `config.findings`) the way `interpret` does."""

    _load_tokenizer = True
    input_type = "multimodal"

    def __call__(self, image, candidate_labels=None, **kwargs):
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def preprocess(self, image, candidate_labels=None):
        return {**super().preprocess(image), "candidate_labels": _findings(candidate_labels, self.model.config)}

    def _zero_shot_scores(self, inputs) -> dict:
        """`zero_shot_scores` against `prompt_embeds` of the labels: the two calls `interpret` makes."""
        prompts = self.model.prompt_embeds(inputs["candidate_labels"], self.tokenizer)
        return self.model.zero_shot_scores(inputs["pixel_values"], prompts)


class AnatomyVLMZeroShotImageClassificationPipeline(_AnatomyVLMZeroShotPipeline):
    """
    Image-level zero-shot finding scores: `classifier(image, candidate_labels=[...])` returns
    `[{"score": p, "label": finding}, ...]`, highest first, where p is the sigmoid of the image-vs-finding logit:
    each finding on its own (they do not sum to 1), as in `interpret(...)["findings"]`. `candidate_labels`
    default to `config.findings`; each is wrapped in the config's `global_prompt_templates`.
    """

    def _sanitize_parameters(self, candidate_labels=None):
        return {"candidate_labels": candidate_labels}, {}, {}

    def _forward(self, inputs):
        return {"candidate_labels": inputs["candidate_labels"], "scores": self._zero_shot_scores(inputs)["global_scores"][0]}

    def postprocess(self, outputs):
        results = [{"score": score, "label": label}
                   for label, score in zip(outputs["candidate_labels"], outputs["scores"].tolist())]
        return sorted(results, key=lambda result: -result["score"])


class AnatomyVLMZeroShotObjectDetectionPipeline(_AnatomyVLMZeroShotPipeline):
    """
    Anatomy-wise zero-shot finding scores: `detector(image, candidate_labels=[...], threshold=0.1, top_k=None)`
    returns one result per (region, finding) pair scoring at least `threshold`, highest first:
    `{"score": p, "label": finding, "region": name, "box": {"xmin", "ymin", "xmax", "ymax"}}`, the box in original
    pixels (floats rounded to 0.01 px). p is the softmax over "<finding> in the <region>" / "no <finding> in the
    <region>", as in `interpret(...)["regions"]`; `threshold=0` returns every pair.
    """

    def _sanitize_parameters(self, candidate_labels=None, threshold=None, top_k=None):
        postprocess = {key: value for key, value in (("threshold", threshold), ("top_k", top_k)) if value is not None}
        return {"candidate_labels": candidate_labels}, {}, postprocess

    def _forward(self, inputs):
        scores = self._zero_shot_scores(inputs)
        boxes = self.image_processor.post_process_boxes(scores["pred_boxes"], inputs["original_sizes"])
        return {"candidate_labels": inputs["candidate_labels"], "region_scores": scores["region_scores"][0],
                "boxes": boxes[0]}

    def postprocess(self, outputs, threshold: float = 0.1, top_k: int | None = None):
        results = []
        for name, box, scores in zip(self.model.config.region_names, outputs["boxes"].tolist(),
                                     outputs["region_scores"].tolist()):
            corners = dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 2) for v in box)))
            results += [{"score": score, "label": label, "region": name, "box": corners}
                        for label, score in zip(outputs["candidate_labels"], scores) if score >= threshold]
        results.sort(key=lambda result: -result["score"])
        return results[:top_k] if top_k else results


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
