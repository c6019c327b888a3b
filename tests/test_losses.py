import math

import pytest
import torch
import torch.nn.functional as F

from modeling_anatomy_vlm.loss_anatomy_vlm import (
    detection_loss,
    global_finding_loss,
    region_phrase_contrastive_loss,
)


def test_detection_loss_matches_hand_computed_values_and_ignores_missing_boxes():
    # Query 0: prediction shifted by 0.1 in x; query 1: perfect; query 2: missing (garbage target, masked).
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4], [0.9, 0.9, 0.1, 0.1]]])
    target = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    total, l1, giou = detection_loss(pred, target, mask, l1_weight=5.0, giou_weight=2.0)
    # L1: 0.1 summed over coords for query 0, 0 for query 1, over 2 present boxes.
    assert l1.item() == pytest.approx(0.1 / 2, abs=1e-6)
    # Query 0 boxes [0.4,0.4,0.6,0.6] vs [0.5,0.4,0.7,0.6]: inter 0.1*0.2, union 0.06, hull 0.3*0.2 = union,
    # so GIoU = IoU = 1/3 and the loss is 2/3; query 1 loss 0.
    assert giou.item() == pytest.approx((2 / 3) / 2, abs=1e-6)
    assert total.item() == pytest.approx(5 * 0.05 + 2 * (1 / 3), abs=1e-5)


def test_detection_loss_giou_term_for_disjoint_boxes():
    pred = torch.tensor([[[0.2, 0.5, 0.2, 0.2]]])  # [0.1,0.4,0.3,0.6]
    target = torch.tensor([[[0.8, 0.5, 0.2, 0.2]]])  # [0.7,0.4,0.9,0.6]
    _, _, giou = detection_loss(pred, target, torch.tensor([[True]]))
    # IoU 0, hull 0.8*0.2=0.16, union 0.08 -> GIoU = -0.5, loss 1.5
    assert giou.item() == pytest.approx(1.5, abs=1e-6)


def test_detection_loss_all_missing_is_zero_and_has_gradient():
    pred = torch.rand(2, 3, 4, requires_grad=True)
    total, _, _ = detection_loss(pred, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_detection_loss_rejects_present_degenerate_box():
    pred = torch.full((1, 2, 4), 0.3)
    target = torch.tensor([[[0.5, 0.5, 0.0, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    with pytest.raises(ValueError, match="1 present target box"):
        detection_loss(pred, target, torch.tensor([[True, True]]))
    # The same degenerate box is fine once masked as missing.
    detection_loss(pred, target, torch.tensor([[False, True]]))


def test_global_loss_is_bce_over_known_labels_only():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert global_finding_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_multi_positive_hand_computed():
    logits = torch.tensor([[[2.0, 1.0, 0.0, 5.0]]])  # one image, one region, 4 texts
    positive = torch.tensor([[[True, True, False, False]]])
    negative = torch.tensor([[[False, False, True, False]]])  # text 3 neither: ignored
    loss = region_phrase_contrastive_loss(logits, positive, negative)
    expected = -math.log((math.e**2 + math.e**1) / (math.e**2 + math.e**1 + 1.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_infonce_duplicate_text_is_never_a_negative():
    # Texts 0 and 2 are the same sentence; only column 0 is marked positive.
    logits = torch.tensor([[[1.0, 0.0, 3.0]]])
    positive = torch.tensor([[[True, False, False]]])
    ids = torch.tensor([7, 8, 7])
    with_ids = region_phrase_contrastive_loss(logits, positive, None, text_ids=ids)
    # Column 2 becomes a positive, column 1 stays the only negative.
    expected = -math.log((math.e**1 + math.e**3) / (math.e**1 + math.e**3 + 1.0))
    assert with_ids.item() == pytest.approx(expected, abs=1e-6)
    # Without ids the duplicate would be punished as a negative: a different, larger loss.
    without_ids = region_phrase_contrastive_loss(logits, positive, None)
    assert without_ids.item() > with_ids.item() + 1.0


def test_infonce_positive_overrides_explicit_negative_and_rows_without_positives_are_skipped():
    logits = torch.tensor([[[1.0, 0.0], [4.0, -4.0]]])  # region 1 has no positive
    positive = torch.tensor([[[True, False], [False, False]]])
    negative = torch.tensor([[[True, True], [True, True]]])
    loss = region_phrase_contrastive_loss(logits, positive, negative)
    expected = -math.log(math.e / (math.e + 1.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_generalized_box_iou_matches_torchvision():
    from torchvision.ops import box_convert
    from torchvision.ops import generalized_box_iou as reference

    from modeling_anatomy_vlm.loss_anatomy_vlm import generalized_box_iou

    torch.manual_seed(0)
    a = torch.cat([torch.rand(50, 2), torch.rand(50, 2) * 0.5 + 0.01], dim=1)
    b = torch.cat([torch.rand(50, 2), torch.rand(50, 2) * 0.5 + 0.01], dim=1)
    b[:5] = a[:5]  # identical boxes: GIoU 1
    expected = torch.diagonal(reference(box_convert(a, "cxcywh", "xyxy"), box_convert(b, "cxcywh", "xyxy")))
    torch.testing.assert_close(generalized_box_iou(a, b), expected, atol=1e-4, rtol=1e-4)  # eps differs
    torch.testing.assert_close(generalized_box_iou(a[:5], b[:5]), torch.ones(5), atol=1e-4, rtol=0)


def test_similarities_and_losses_are_fp32_under_bf16_autocast(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    generator = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(2, 3, 32, generator=generator), dim=-1).bfloat16()
    phrases = F.normalize(torch.randn(5, 32, generator=generator), dim=-1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.region_logits(regions, phrases)
        eager_bf16 = model.logit_scale_fine.exp() * torch.einsum("bqd,td->bqt", regions, phrases)
        positive = torch.zeros(2, 3, 5, dtype=torch.bool)
        positive[:, :, 0] = True
        fine = region_phrase_contrastive_loss(eager_bf16, positive)
        box = detection_loss(torch.rand(2, 3, 4).bfloat16() * 0.5 + 0.25, torch.full((2, 3, 4), 0.5),
                             torch.ones(2, 3, dtype=torch.bool))[0]
        global_ = global_finding_loss(eager_bf16[:, 0], torch.ones(2, 5))
    reference = model.logit_scale_fine.exp() * torch.einsum("bqd,td->bqt", regions.float(), phrases.float())
    assert logits.dtype == torch.float32 and eager_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    assert (eager_bf16.float() - reference).abs().max() > 1e-3  # what bf16 would have given: visibly off
    assert fine.dtype == box.dtype == global_.dtype == torch.float32


def test_text_to_image_infonce_hand_computed_over_the_images_of_a_column():
    logits = torch.tensor([[[2.0, 0.0]], [[1.0, 3.0]], [[0.0, 1.0]]])  # 3 images, 1 region, 2 texts
    positive = torch.tensor([[[True, True]], [[False, True]], [[False, False]]])
    negative = torch.tensor([[[False, False]], [[True, False]], [[True, False]]])  # text 1: no negative, skipped
    loss = region_phrase_contrastive_loss(logits, positive, negative, direction="text_to_image")
    assert loss.item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + math.e + 1.0)), abs=1e-6)
    both = region_phrase_contrastive_loss(logits, positive, negative, direction="both")
    image_to_text = region_phrase_contrastive_loss(logits, positive, negative)
    assert both.item() == pytest.approx((loss.item() + image_to_text.item()) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="direction"):
        region_phrase_contrastive_loss(logits, positive, negative, direction="sideways")


def _blind_optimum(positive, negative, direction, steps=200):
    """The lowest L_fine a model reaches that sees region and text but no pixels: one free logit per (region, text),
    the same for every image, fitted by Adam; and the loss of uniform logits."""
    table = torch.zeros(positive.shape[1:], requires_grad=True)
    optimiser = torch.optim.Adam([table], lr=0.3)
    for _ in range(steps):
        loss = region_phrase_contrastive_loss(table.expand_as(positive), positive, negative, direction=direction)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    uniform = region_phrase_contrastive_loss(torch.zeros(positive.shape), positive, negative, direction=direction)
    return loss.item(), uniform.item()


def test_without_pixels_text_to_image_fine_loss_stays_at_chance_on_collated_phantom_batches(phantom_root,
                                                                                              dataset_cache):
    """On batches the training collator's label generation makes from the phantom scene graphs, a pixel-blind
    model solves most of the image-to-text L_fine from wording and priors, and none of the text-to-image one."""
    import numpy as np

    from modeling_anatomy_vlm import AnatomyVLMConfig
    from train.data.common import region_phrases_of
    from train.data.imagenome import load_imagenome
    from train.text.region_texts import (
        RegionPrompts, region_text_masks, region_text_supervision, region_texts_for_image,
    )

    config = AnatomyVLMConfig()
    names, findings = config.region_names, config.findings
    rows = list(load_imagenome(phantom_root, "train", region_names=names, findings=findings)
                .select_columns(["region_phrases"]))
    prompts, rng = RegionPrompts.from_config(config), np.random.default_rng(0)
    fits = {"image_to_text": [], "text_to_image": []}
    for batch in range(2):
        chosen = [rows[i] for i in rng.choice(len(rows), size=16, replace=False)]
        items = [region_texts_for_image(region_phrases_of(row["region_phrases"]), np.random.default_rng([batch, i]),
                                        findings=findings, region_names=names, prompts=prompts)
                 for i, row in enumerate(chosen)]
        positive, negative = region_text_masks(**region_text_supervision(items).tensors())
        for direction in fits:
            fits[direction].append(_blind_optimum(positive, negative, direction))
    for fitted, uniform in fits["text_to_image"]:
        assert uniform > 0.3 and fitted == pytest.approx(uniform, rel=1e-4)  # constant over the images: chance
    for fitted, uniform in fits["image_to_text"]:
        assert fitted < 0.5 * uniform  # wording and priors alone solve most of it
