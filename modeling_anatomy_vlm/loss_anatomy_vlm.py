"""The three Anatomy-VLM objectives as pure functions (no module state), so each is testable on its own.

Box convention everywhere: normalised (cx, cy, w, h) in the processed (resized + padded) image. Every loss is
computed in fp32, whatever precision its inputs come in (bf16 under autocast).
"""

import torch
import torch.nn.functional as F

FINE_LOSS_DIRECTIONS = ("image_to_text", "text_to_image", "both")  # see `region_phrase_contrastive_loss`


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise GIoU of (cx, cy, w, h) boxes `[..., 4]`: clamps instead of boolean masks, so it compiles
    into one graph and never syncs with the host."""
    a, b = _cxcywh_to_xyxy(boxes_a), _cxcywh_to_xyxy(boxes_b)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    inter = ((torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
             * (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0))
    union = area_a + area_b - inter
    hull = ((torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0]))
            * (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])))
    iou = inter / (union + eps)
    return iou - (hull - union) / (hull + eps)


def detection_loss(
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    box_mask: torch.Tensor,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 + GIoU between each anatomy query's box and its region's true box, over present boxes only.

    Query i always predicts region i, so no Hungarian matching is needed. Regions missing from an image
    (`box_mask` False) are left out of both terms and of the normaliser, never zero-filled. A present target
    box with zero or negative width/height is a data error (the loaders drop or clip those) and is rejected.

    Args:
        pred_boxes: `[B, Q, 4]` predicted (cx, cy, w, h).
        target_boxes: `[B, Q, 4]` true (cx, cy, w, h); rows where `box_mask` is False are ignored.
        box_mask: `[B, Q]` bool, True where the region's box is known.

    Returns:
        `(weighted_loss, l1, giou)`, each a scalar: mean per present box (L1 summed over the 4 coordinates).
    """
    box_mask = box_mask.bool()
    pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
    # A data check. Reading its result is a host-device sync, so it runs on CPU tensors only (and never inside a
    # compiled step); on GPUs the loaders and the processor already mask boxes without area.
    if pred_boxes.device.type == "cpu" and not torch.compiler.is_compiling():
        degenerate = box_mask & ((target_boxes[..., 2] <= 0) | (target_boxes[..., 3] <= 0))
        if degenerate.any():
            raise ValueError(
                f"detection_loss: {int(degenerate.sum())} present target box(es) have zero or negative width/height; "
                "drop or clip them when loading (set their box_mask to False)"
            )
    weights = box_mask.to(pred_boxes.dtype)  # [B, Q]
    num_boxes = weights.sum().clamp(min=1.0)
    # Masked rows get a harmless dummy target so GIoU never sees a degenerate box.
    safe_targets = torch.where(box_mask[..., None], target_boxes, pred_boxes.detach())
    l1 = (F.l1_loss(pred_boxes, safe_targets, reduction="none").sum(-1) * weights).sum() / num_boxes
    giou = 1 - generalized_box_iou(pred_boxes, safe_targets)  # [B, Q]
    giou = (giou * weights).sum() / num_boxes
    return l1_weight * l1 + giou_weight * giou, l1, giou


def global_finding_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label sigmoid cross-entropy of image-vs-finding logits.

    Args:
        logits: `[B, F]` scaled cosine similarities (+ bias) of image embeddings and finding-name embeddings.
        labels: `[B, F]` 1 = finding present, 0 = absent, any negative value = unknown (left out).
    """
    logits = logits.float()
    known = labels >= 0
    loss = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def region_phrase_contrastive_loss(
    logits: torch.Tensor,
    positive_mask: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    direction: str = "image_to_text",
) -> torch.Tensor:
    """InfoNCE between region embeddings and phrase embeddings with explicit positives and negatives.

    `direction="image_to_text"` (the paper): for every (image, region) row with at least one positive phrase,
    `-log( sum_pos exp(logit) / sum_{pos + neg} exp(logit) )` over the texts (several positives allowed, as one
    phrase can describe several regions). Texts that are neither positive nor negative for a row are ignored.
    `"text_to_image"`: the same for every (region, text) column with a positive and a negative, over the batch's
    images: every candidate has the same text at the same region, so only the pixels can rank them.
    `"both"`: the mean of the two.

    A text is never a negative for a region it is positive for: a column whose text is identical to a positive
    column of that row (same `text_ids`) is promoted to positive, and positives are removed from the negatives.

    Args:
        logits: `[B, Q, T]` scaled cosine similarities of region embeddings and phrase embeddings.
        positive_mask: `[B, Q, T]` bool.
        negative_mask: `[B, Q, T]` bool; None means every non-positive text is a negative.
        text_ids: `[T]` integer id of each column's text; equal ids mean identical texts.
    """
    if direction not in FINE_LOSS_DIRECTIONS:
        raise ValueError(f"direction must be one of {FINE_LOSS_DIRECTIONS}, got {direction!r}")
    logits = logits.float()
    positive_mask = positive_mask.bool()
    if text_ids is not None:
        same_text = text_ids[:, None] == text_ids[None, :]  # [T, T]
        positive_mask = (positive_mask.float() @ same_text.float()) > 0
    if negative_mask is None:
        negative_mask = ~positive_mask
    negative_mask = negative_mask.bool() & ~positive_mask
    neg_inf = torch.finfo(logits.dtype).min
    candidates = logits.masked_fill(~(positive_mask | negative_mask), neg_inf)
    positives = logits.masked_fill(~positive_mask, neg_inf)
    losses = []
    if direction in ("image_to_text", "both"):  # over the texts of each (image, region) row: [B, Q]
        per_row = torch.logsumexp(candidates, dim=-1) - torch.logsumexp(positives, dim=-1)
        has_positive = positive_mask.any(-1)
        losses.append((per_row * has_positive).sum() / has_positive.sum().clamp(min=1))
    if direction in ("text_to_image", "both"):  # over the images of each (region, text) column: [Q, T]
        per_column = torch.logsumexp(candidates, dim=0) - torch.logsumexp(positives, dim=0)
        contrasted = positive_mask.any(0) & negative_mask.any(0)
        losses.append((per_column * contrasted).sum() / contrasted.sum().clamp(min=1))
    return sum(losses) / len(losses)
