import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from conftest import tiny_config
from modeling_anatomy_vlm import ANATOMICAL_REGIONS, AnatomyVLMConfig, AnatomyVLMModel


def test_regions_are_the_29_chest_imagenome_names_in_order():
    assert len(ANATOMICAL_REGIONS) == 29
    assert ANATOMICAL_REGIONS[0] == "right lung" and ANATOMICAL_REGIONS[8] == "left lung"
    assert ANATOMICAL_REGIONS[24] == "cardiac silhouette" and ANATOMICAL_REGIONS[28] == "abdomen"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"text_pooling": "max"}, "text_pooling"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"bbox_giou_weight": -1.0}, "bbox_giou_weight"),
        ({"region_names": ["a", "a"]}, "region_names must be unique"),
        ({"region_prompt_templates": ["{finding} somewhere"]}, "region_prompt_templates"),
        ({"region_prompt_templates": ["{finding} in the {region}", "{region}: {finding}"]}, "as many wordings"),
        ({"vision_config": {"model_type": "bert"}}, "vision_config.model_type"),
        ({"vision_config": {"model_type": "vit", "image_size": 100, "patch_size": 16}}, "multiple of patch_size"),
        ({"patch_embedding": "mlp"}, "patch_embedding must be one of"),
        ({"embedding_pooling": "max"}, "embedding_pooling must be one of"),
        ({"patch_embedding": "conv", "vision_config": {"model_type": "vit", "image_size": 96, "patch_size": 12}},
         "patch_size must be a power of 2"),
    ],
)
def test_invalid_config_values_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        AnatomyVLMConfig(**overrides)


def test_forward_output_shapes_and_losses(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batch, queries, num_findings, num_phrases = 2, 29, 3, 5
    pixel_values = torch.randn(batch, 3, 64, 64)
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.3]).expand(batch, queries, 4)
    text = processor(text=["lung opacity", "pneumothorax", "pleural effusion"])
    phrases = processor(text=[f"phrase {i}" for i in range(num_phrases)])
    positive = torch.zeros(batch, queries, num_phrases, dtype=torch.bool)
    positive[:, 0, 0] = True
    out = model(
        pixel_values,
        boxes=boxes,
        box_mask=torch.ones(batch, queries, dtype=torch.bool),
        finding_labels=torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
        finding_input_ids=text["input_ids"],
        finding_attention_mask=text["attention_mask"],
        phrase_input_ids=phrases["input_ids"],
        phrase_attention_mask=phrases["attention_mask"],
        phrase_positive_mask=positive,
    )
    num_patches = (64 // 16) ** 2
    assert out.pred_boxes.shape == (batch, queries, 4)
    assert ((out.pred_boxes > 0) & (out.pred_boxes < 1)).all()
    assert out.image_embeds.shape == (batch, 32)
    assert out.region_embeds.shape == (batch, queries, 32)
    assert torch.allclose(out.region_embeds.norm(dim=-1), torch.ones(batch, queries), atol=1e-5)
    assert out.global_logits.shape == (batch, num_findings)
    assert out.region_logits.shape == (batch, queries, num_phrases)
    assert out.last_hidden_state.shape == (batch, 1 + num_patches + queries, 64)
    for term in (out.loss_anatomy, out.loss_global, out.loss_fine):
        assert term.shape == () and torch.isfinite(term)
    assert torch.allclose(out.loss, out.loss_anatomy + out.loss_global + out.loss_fine)
    # The text side used inside forward equals get_text_features.
    expected = model.get_text_features(text["input_ids"], text["attention_mask"])
    scale = model.logit_scale_global.exp()
    assert torch.allclose(out.global_logits, scale * out.image_embeds @ expected.T + model.logit_bias_global, atol=1e-5)


def test_loss_weights_weigh_the_computed_terms_and_leave_out_the_others(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    text = processor(text=["lung opacity", "pneumothorax"])
    inputs = dict(pixel_values=torch.randn(1, 3, 64, 64), boxes=torch.full((1, 29, 4), 0.3),
                  finding_labels=torch.tensor([[1.0, 0.0]]), finding_input_ids=text["input_ids"],
                  finding_attention_mask=text["attention_mask"])
    with torch.no_grad():
        out = model(**inputs, loss_weights={"anatomy": 0.5, "global": 2.0, "fine": 1.0})
        torch.testing.assert_close(out.loss, 0.5 * out.loss_anatomy + 2.0 * out.loss_global)
        only_detection = model(**inputs, loss_weights={"anatomy": 1.0})
        torch.testing.assert_close(only_detection.loss, only_detection.loss_anatomy)
        assert only_detection.loss_global is not None  # computed and reported, not summed
        with pytest.raises(ValueError, match="unknown terms \\['detection'\\]"):
            model(**inputs, loss_weights={"detection": 1.0})


def test_cached_text_tower_embeds_give_the_same_loss(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    text = processor(text=["lung opacity", "no pneumothorax"])
    pixel_values = torch.randn(1, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0]])
    live = model(pixel_values, finding_labels=labels, finding_input_ids=text["input_ids"],
                 finding_attention_mask=text["attention_mask"])
    cached = model(pixel_values, finding_labels=labels,
                   finding_text_embeds=model.get_text_tower_embeds(text["input_ids"], text["attention_mask"]))
    assert torch.allclose(live.loss, cached.loss, atol=1e-6)


def test_gradients_reach_anatomy_queries_but_never_the_text_tower(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    model.train()
    model.zero_grad()
    text = processor(text=["lung opacity", "pleural effusion"])
    positive = torch.zeros(1, 29, 2, dtype=torch.bool)
    positive[0, 6, 1] = True
    out = model(
        torch.randn(1, 3, 64, 64),
        boxes=torch.full((1, 29, 4), 0.3),
        finding_labels=torch.tensor([[1.0, 0.0]]),
        finding_input_ids=text["input_ids"],
        finding_attention_mask=text["attention_mask"],
        phrase_input_ids=text["input_ids"],
        phrase_attention_mask=text["attention_mask"],
        phrase_positive_mask=positive,
    )
    out.loss.backward()
    queries_grad = model.vision_model.anatomy_queries.embeddings.grad
    assert queries_grad is not None and queries_grad.abs().sum() > 0
    assert model.text_projection.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.text_model.parameters())
    assert not model.text_model.training  # frozen tower stays in eval mode (no dropout)
    model.zero_grad()
    model.eval()


def _write_vit(path, image_size):
    torch.manual_seed(1)
    config = ViTConfig(image_size=image_size, patch_size=16, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128)
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(path)
    return model


def _write_dinov2(path, image_size):
    torch.manual_seed(2)
    config = Dinov2Config(image_size=image_size, patch_size=16, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, mlp_ratio=2, layerscale_value=0.5)
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # non-trivial layer scales, so a missed copy would show
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.2, 1.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("writer, model_type", [(_write_vit, "vit"), (_write_dinov2, "dinov2")])
def test_vision_tower_initialises_from_vit_and_dinov2_checkpoints(tmp_path, writer, model_type):
    source = writer(tmp_path / "tower", image_size=64)
    vision_config = source.config.to_dict()
    config = AnatomyVLMConfig(vision_config=vision_config, projection_dim=32)
    model = AnatomyVLMModel(config).eval()
    model.load_vision_encoder(str(tmp_path / "tower"))
    tower = model.vision_model
    layer0 = source.layers[0] if model_type == "vit" else source.encoder.layer[0]
    qkv = torch.cat([layer0.attention.q_proj.weight, layer0.attention.k_proj.weight, layer0.attention.v_proj.weight])
    assert torch.equal(tower.blocks[0].attn.qkv.weight, qkv)
    assert torch.equal(tower.embeddings.cls_token, source.embeddings.cls_token)
    # Functional check: our blocks over [CLS] + patches reproduce the source model's last hidden state.
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = tower.embeddings(pixel_values)
        for block in tower.blocks:
            x = block(x)
        ours = tower.norm(x)
        theirs = source(pixel_values=pixel_values).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_position_embeddings_are_interpolated_to_the_configured_resolution(tmp_path):
    source = _write_vit(tmp_path / "tower", image_size=32)  # 2 x 2 grid
    vision_config = source.config.to_dict() | {"image_size": 64}  # 4 x 4 grid
    model = AnatomyVLMModel(AnatomyVLMConfig(vision_config=vision_config, projection_dim=32))
    model.load_vision_encoder(str(tmp_path / "tower"))
    pos = model.vision_model.embeddings.position_embeddings
    assert pos.shape == (1, 1 + 16, 64)
    assert torch.equal(pos[:, 0], source.embeddings.position_embeddings[:, 0])  # [CLS] kept as is
    # A constant source grid interpolates to the same constant.
    with torch.no_grad():
        source.embeddings.position_embeddings[:, 1:] = 0.25
    source.save_pretrained(tmp_path / "constant")
    model.load_vision_encoder(str(tmp_path / "constant"))
    assert torch.allclose(model.vision_model.embeddings.position_embeddings[:, 1:], torch.tensor(0.25), atol=1e-6)


def test_conv_patch_embedding_downsamples_by_the_patch_size_and_round_trips_its_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = AnatomyVLMModel(tiny_config(patch_embedding="conv"))
    stem = model.vision_model.embeddings.patch_embed
    strides = [m.stride[0] for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 1] * 4 + [1]  # 16 = 2^4: four stride-2 stages, then the 1x1 projection
    pixels = torch.randn(3, 3, 64, 64)
    assert model.vision_model(pixels).shape == (3, 1 + 16 + 29, 64)  # [CLS] + 4 x 4 patches + queries
    model.train()
    model(pixel_values=pixels)  # moves the BatchNorm running statistics away from their initial 0 / 1
    running_mean = stem[1].running_mean.clone()
    assert running_mean.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / "conv")
    loaded = AnatomyVLMModel.from_pretrained(tmp_path / "conv").eval()
    assert torch.equal(loaded.vision_model.embeddings.patch_embed[1].running_mean, running_mean)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).image_embeds, model(pixel_values=pixels).image_embeds)


def test_vision_checkpoint_into_a_conv_stem_is_refused(tmp_path):
    _write_vit(tmp_path / "tower", image_size=64)
    model = AnatomyVLMModel(tiny_config(patch_embedding="conv"))
    with pytest.raises(ValueError, match="patch_embedding is 'conv'"):
        model.load_vision_encoder(str(tmp_path / "tower"))


def test_vision_checkpoint_of_another_size_is_refused(tmp_path):
    _write_vit(tmp_path / "tower", image_size=64)
    narrower = dict(model_type="vit", image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    model = AnatomyVLMModel(AnatomyVLMConfig(vision_config=narrower, projection_dim=16))
    with pytest.raises(ValueError, match="has shape"):
        model.load_vision_encoder(str(tmp_path / "tower"))


def test_interpret_returns_the_documented_structure(tiny_model_and_processor, chest_like_image):
    model, processor = tiny_model_and_processor
    results = model.interpret([chest_like_image, chest_like_image[:100]], processor,
                              findings=["pleural effusion", "a free-text finding"])
    assert len(results) == 2
    first = results[0]
    assert first["image_size"] == [140, 180]
    assert results[1]["image_size"] == [140, 100]
    assert [r["name"] for r in first["regions"]] == list(ANATOMICAL_REGIONS)
    for region in first["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert 0 <= x1 <= x2 <= 140 and 0 <= y1 <= y2 <= 180
        assert set(region["scores"]) == {"pleural effusion", "a free-text finding"}
        assert all(0.0 <= p <= 1.0 for p in region["scores"].values())
    assert set(first["findings"]) == {"pleural effusion", "a free-text finding"}
    # Same image alone gives the same answer (batching does not change results).
    alone = model.interpret(chest_like_image, processor, findings=["pleural effusion", "a free-text finding"])[0]
    assert alone["findings"] == pytest.approx(first["findings"], abs=1e-5)


def test_interpret_region_score_is_the_softmax_over_the_prompt_pair(tiny_model_and_processor, chest_like_image):
    model, processor = tiny_model_and_processor
    result = model.interpret(chest_like_image, processor, findings=["pneumothorax"])[0]
    pixel_values = processor(images=chest_like_image)["pixel_values"]
    with torch.no_grad():
        region = model.get_region_features(pixel_values)[0, 5]  # right apical zone
        pos, neg = model.embed_texts(["pneumothorax in the right apical zone",
                                      "no pneumothorax in the right apical zone"], processor.tokenizer)
        scale = model.logit_scale_fine.exp()
        expected = torch.softmax(scale * torch.stack([region @ pos, region @ neg]), 0)[0].item()
    assert result["regions"][5]["scores"]["pneumothorax"] == pytest.approx(expected, abs=1e-5)


def test_interpret_rejects_empty_findings(tiny_model_and_processor, chest_like_image):
    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="findings"):
        model.interpret(chest_like_image, processor, findings=["  "])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = AnatomyVLMModel(tiny_config()).train()
    pixels, boxes = torch.randn(2, 3, 64, 64), torch.rand(2, 29, 4) * 0.2 + 0.3
    model(pixel_values=pixels, boxes=boxes).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.vision_model.gradient_checkpointing
    model(pixel_values=pixels, boxes=boxes).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5, msg=name)


def test_box_pooling_weights_cover_the_box():
    from modeling_anatomy_vlm.modeling_anatomy_vlm import box_pooling_weights

    # grid 4x4; box = the top-left 2x2 patches, and a box smaller than one patch around patch (row 3, col 2)
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.625, 0.875, 0.05, 0.05]]])
    weights = box_pooling_weights(boxes, 4).reshape(1, 2, 4, 4)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, 2))
    assert weights[0, 0, :2, :2].sum() > 0.9 and weights[0, 0, 2:, 2:].sum() < 0.01
    assert weights[0, 1].argmax() == 3 * 4 + 2


def test_region_embeddings_depend_on_the_region_content(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    torch.manual_seed(0)
    a = torch.randn(1, 3, 64, 64)
    b = a.clone()
    with torch.no_grad():
        boxes = model.encode_image(a)["pred_boxes"][0]
        x1, x2 = int((boxes[24, 0] - boxes[24, 2] / 2) * 64), int((boxes[24, 0] + boxes[24, 2] / 2) * 64)
        b[..., :, max(x1, 0):max(x2, x1 + 8)] += 3.0  # change the pixels under the cardiac silhouette's box
        ea, eb = model.encode_image(a)["region_embeds"], model.encode_image(b)["region_embeds"]
    assert (ea[0, 24] - eb[0, 24]).norm() > 1e-3


def test_region_loss_trains_the_score_interpret_reports(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    findings = ["pleural effusion", "pneumothorax"]
    config = model.config
    texts = [[t[0].format(finding=f, region=r) for r in config.region_names for f in findings]
             for t in (config.region_prompt_templates, config.region_negated_prompt_templates)]
    tokens = [processor.tokenize(group) for group in texts]
    tower = torch.stack([model.get_text_tower_embeds(t["input_ids"], t["attention_mask"]).reshape(29, 2, -1)
                         for t in tokens])
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    labels = torch.full((3, 29, 2), -1.0)
    labels[0, 6, 0], labels[1, 6, 0], labels[2, 0, 1] = 1.0, 0.0, 1.0
    with torch.no_grad():
        output = model(pixel_values=pixels, region_prompt_text_embeds=tower, region_labels=labels)
        scores = model.zero_shot_scores(pixels, model.prompt_embeds(findings, processor.tokenizer))["region_scores"]
    known = labels >= 0
    expected = torch.nn.functional.binary_cross_entropy(scores[known], labels[known])
    torch.testing.assert_close(output.loss_region, expected, atol=1e-4, rtol=1e-4)


def test_paper_pooling_is_cls_and_anatomy_token_plus_mean_patch(tmp_path):
    torch.manual_seed(0)
    model = AnatomyVLMModel(tiny_config(embedding_pooling="paper")).eval()
    hidden = model.config.vision_config.hidden_size
    assert model.visual_projection.in_features == hidden and model.region_projection.in_features == 2 * hidden
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.encode_image(pixels)
        states = model.vision_model(pixels)
    q = model.config.num_anatomy_queries
    cls, patches, anatomy = states[:, 0], states[:, 1:-q], states[:, -q:]
    image = torch.nn.functional.normalize(model.visual_projection(cls), dim=-1)
    mean = patches.mean(1, keepdim=True).expand_as(anatomy)
    region = torch.nn.functional.normalize(model.region_projection(torch.cat([anatomy, mean], -1)), dim=-1)
    torch.testing.assert_close(features["image_embeds"], image)
    torch.testing.assert_close(features["region_embeds"], region)
    model.save_pretrained(tmp_path)
    assert AnatomyVLMModel.from_pretrained(tmp_path).config.embedding_pooling == "paper"
    assert AnatomyVLMConfig().embedding_pooling == "box"  # checkpoints saved before the option keep their pooling


def test_training_and_zero_shot_scoring_ensemble_prompt_wordings_alike(tiny_model_and_processor):
    """With several template wordings, the logits and region loss of a training step (cached tower outputs, one per
    wording) are those of `prompt_embeds`, which zero-shot scoring uses: one ensembling rule."""
    _, processor = tiny_model_and_processor
    torch.manual_seed(0)
    model = AnatomyVLMModel(tiny_config(
        global_prompt_templates=["{finding}", "findings of {finding}", "there is {finding}"],
        region_prompt_templates=["{finding} in the {region}", "{region} with {finding}"],
        region_negated_prompt_templates=["no {finding} in the {region}", "{region} without {finding}"])).eval()
    findings = ["pleural effusion", "pneumothorax"]
    groups = model.prompt_groups(findings)
    outputs = model.text_tower_outputs([t for group in groups for t in group], processor.tokenizer)
    tower = [torch.stack([outputs[t] for t in group]) for group in groups]
    finding_tower = torch.stack(tower[:2])  # [F, 3, H]
    pair_tower = torch.stack(tower[2:]).reshape(2, 29, 2, 2, -1)  # [2, Q, F, K, H]
    pixels = torch.randn(3, 3, 64, 64)
    labels = torch.full((3, 29, 2), -1.0)
    labels[0, 6, 0], labels[1, 6, 0], labels[2, 0, 1] = 1.0, 0.0, 1.0
    with torch.no_grad():
        output = model(pixel_values=pixels, finding_text_embeds=finding_tower, finding_labels=torch.ones(3, 2),
                       region_prompt_text_embeds=pair_tower, region_labels=labels)
        scores = model.zero_shot_scores(pixels, model.prompt_embeds(findings, processor.tokenizer))
        single = model(pixel_values=pixels, finding_text_embeds=finding_tower[:, 0], finding_labels=torch.ones(3, 2))
    torch.testing.assert_close(output.global_logits, scores["global_logits"], atol=1e-5, rtol=1e-5)
    known = labels >= 0
    expected = torch.nn.functional.binary_cross_entropy(scores["region_scores"][known], labels[known])
    torch.testing.assert_close(output.loss_region, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(single.global_logits, scores["global_logits"], atol=1e-3)  # the wordings matter


def test_other_prompts_score_encoded_images_as_a_new_forward_pass_would(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    pixels = torch.randn(2, 3, 64, 64)
    first = model.prompt_embeds(["pleural effusion"], processor.tokenizer)
    other = model.prompt_embeds(["pneumothorax", "a calcified nodule"], processor.tokenizer)
    with torch.no_grad():
        scores = model.zero_shot_scores(pixels, first)
        reused = model.score_embeddings(scores["image_embeds"], scores["region_embeds"], other)
        fresh = model.zero_shot_scores(pixels, other)
    assert reused["region_scores"].shape == (2, 29, 2) and reused["global_logits"].shape == (2, 2)
    for key in ("region_scores", "global_scores", "region_log_odds", "global_logits"):
        torch.testing.assert_close(reused[key], fresh[key])
    torch.testing.assert_close(reused["global_scores"], reused["global_logits"].sigmoid())
    assert not torch.allclose(reused["global_logits"][:, 0], scores["global_logits"][:, 0])  # other prompts, other scores


def test_fine_loss_direction_is_read_from_the_config_and_checked():
    from modeling_anatomy_vlm.loss_anatomy_vlm import region_phrase_contrastive_loss

    with pytest.raises(ValueError, match="fine_loss_direction must be one of"):
        tiny_config(fine_loss_direction="sideways")
    torch.manual_seed(0)
    model = AnatomyVLMModel.from_encoders(tiny_config(fine_loss_direction="text_to_image")).eval()
    pixels, phrases = torch.randn(3, 3, 64, 64), torch.randn(4, model.config.text_config.hidden_size)
    positive = torch.zeros(3, 29, 4, dtype=torch.bool)
    positive[0, 5, 0] = positive[1, 5, 1] = positive[2, 7, 2] = True
    negative = torch.zeros_like(positive)
    negative[1:, 5, 0] = negative[0, 5, 1] = negative[:2, 7, 2] = True
    with torch.no_grad():
        out = model(pixels, phrase_text_embeds=phrases, phrase_positive_mask=positive, phrase_negative_mask=negative)
    for direction, compare in (("text_to_image", torch.testing.assert_close), ("image_to_text", None)):
        expected = region_phrase_contrastive_loss(out.region_logits, positive, negative, direction=direction)
        if compare:
            compare(out.loss_fine, expected)
        else:
            assert not torch.allclose(out.loss_fine, expected)
