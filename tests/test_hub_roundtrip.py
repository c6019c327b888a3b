"""A saved checkpoint must load through the Auto classes with trust_remote_code where this project is absent."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import BLOCK_PROJECT_IMPORTS

LOADER = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import json
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

    checkpoint, image_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    result = {
        "classes": [type(x).__module__ for x in (model, processor, image_processor, config)],
        "image_processor_size": image_processor.size,
        "interpret": model.interpret([image_path], processor, findings=["pleural effusion", "rib fracture"]),
    }
    json.dump(result, open(out_path, "w"))
    """
)


def test_checkpoint_round_trips_through_auto_classes_without_the_project(tmp_path, tiny_model_and_processor, chest_like_image):
    model, processor = tiny_model_and_processor
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    image_path = tmp_path / "cxr.png"
    Image.fromarray(chest_like_image).save(image_path)

    files = set(os.listdir(checkpoint))
    assert {"model.safetensors", "config.json", "modeling_anatomy_vlm.py", "configuration_anatomy_vlm.py",
            "image_processing_anatomy_vlm.py", "processing_anatomy_vlm.py", "loss_anatomy_vlm.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_anatomy_vlm.AnatomyVLMConfig",
                        "AutoModel": "modeling_anatomy_vlm.AnatomyVLMModel"}
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:  # the frozen text tower ships too
        assert any(key.startswith("text_model.") for key in weights.keys())

    out_path = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", LOADER, str(checkpoint), str(image_path), str(out_path)],
        cwd=tmp_path, env=env, check=True, timeout=300,
    )
    loaded = json.loads(out_path.read_text())
    assert all(module.startswith("transformers_modules.") for module in loaded["classes"])
    assert loaded["image_processor_size"] == 64

    expected = model.interpret([str(image_path)], processor, findings=["pleural effusion", "rib fracture"])[0]
    got = loaded["interpret"][0]
    assert got["image_size"] == expected["image_size"]
    for ours, theirs in zip(expected["regions"], got["regions"]):
        assert ours["name"] == theirs["name"]
        np.testing.assert_allclose(ours["box"], theirs["box"], atol=1e-2)  # boxes are rounded to 0.01 px
        for finding in ("pleural effusion", "rib fracture"):
            assert theirs["scores"][finding] == pytest.approx(ours["scores"][finding], abs=1e-5)
    for finding in ("pleural effusion", "rib fracture"):
        assert got["findings"][finding] == pytest.approx(expected["findings"][finding], abs=1e-5)
