"""The text-tower outputs `interpret` keeps: a memo bounded in bytes, and a checkpoint's precomputed default prompts."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import BLOCK_PROJECT_IMPORTS, TINY_VISION, tiny_config
from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor
from modeling_anatomy_vlm.prompt_memo_anatomy_vlm import PROMPT_EMBEDS_NAME, PromptMemo, entry_bytes

FINDINGS = ["pleural effusion", "pneumothorax"]
# One BERT layer as wide as MiniLM: text-tower outputs of the real size, embedded fast (random weights).
ONE_LAYER_TEXT = dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)


class ForbiddenTower(AssertionError):
    pass


def forbid_text_tower(model):
    def forward(*args, **kwargs):
        raise ForbiddenTower("the text tower ran")

    model.text_model.forward = forward


@pytest.fixture
def checkpoint(tmp_path):
    """A saved tiny checkpoint with two findings, its default prompts precomputed."""
    torch.manual_seed(0)
    config = tiny_config(findings=FINDINGS)
    model = AnatomyVLMModel.from_encoders(config).eval()
    processor = AnatomyVLMProcessor.from_model_config(config)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.save_prompt_embeds(folder, processor)
    return folder, model, processor


def test_memo_evicts_least_recently_used_within_its_budget_and_keeps_pinned_entries():
    hidden = 8
    per_entry = entry_bytes("text 0", hidden)
    memo = PromptMemo(max_bytes=3 * per_entry)
    memo.pin({"pinned": torch.ones(hidden)})
    memo.store([f"text {i}" for i in range(3)], torch.arange(3.0)[:, None].expand(3, hidden))
    assert memo.lookup(["text 0"])["text 0"][0] == 0  # text 0 is now the most recently used
    memo.store(["text 3"], torch.full((1, hidden), 3.0))
    known = memo.lookup(["text 0", "text 1", "text 2", "text 3", "pinned"])
    assert set(known) == {"text 0", "text 2", "text 3", "pinned"}  # text 1 was the least recently used
    assert memo.nbytes == 3 * per_entry <= memo.max_bytes
    memo.store(["pinned"], torch.zeros(1, hidden))  # a pinned text is never replaced
    torch.testing.assert_close(memo.lookup(["pinned"])["pinned"], torch.ones(hidden))

    copied = copy.deepcopy(memo)  # a deep-copied model (LoRA merge) gets an empty memo with the same budget
    assert (len(copied), copied.max_bytes) == (0, memo.max_bytes)
    memo.max_bytes = 0  # nothing fits: nothing is kept
    memo.store(["text 4"], torch.zeros(1, hidden))
    assert memo.lookup(["text 4"]) == {} and memo.nbytes == 0


# Run in a fresh interpreter: resident memory is the whole process's, and other tests' servers and threads move it.
MEMO_RUN = textwrap.dedent(
    """
    import gc, json, os, sys
    import numpy as np, torch
    from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor

    def resident_bytes():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def live_tensor_bytes():  # every distinct CPU tensor storage Python still reaches: no allocator noise
        gc.collect()
        storages = {}
        for obj in gc.get_objects():
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return sum(storages.values())

    config_kwargs, budget = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    config = AnatomyVLMConfig(**config_kwargs)
    model, processor = AnatomyVLMModel(config).eval(), AnatomyVLMProcessor.from_model_config(config)
    model.prompt_memo.max_bytes = budget
    image = np.full((64, 64), 0.5, dtype=np.float32)
    for warm in range(3):  # the tower's first batches set the allocator's high-water mark
        model.interpret(image, processor, findings=[f"warm-up {warm} {j}" for j in range(10)])
    tensors_before, resident_before, largest_memo = live_tensor_bytes(), resident_bytes(), 0
    for start in range(0, 500, 10):
        if start == 250:
            resident_half = resident_bytes()
        model.interpret(image, processor, findings=[f"free-text finding number {i}" for i in range(start, start + 10)])
        largest_memo = max(largest_memo, model.prompt_memo.nbytes)
    print(json.dumps({"largest_memo": largest_memo, "entries": len(model.prompt_memo),
                      "tensor_growth": live_tensor_bytes() - tensors_before,
                      "resident_growth": resident_bytes() - resident_before,
                      "resident_growth_last_250": resident_bytes() - resident_half}))
    """
)


def test_500_new_findings_through_interpret_stay_within_the_memo_budget():
    budget = 2 * 2**20
    config = dict(vision_config=dict(TINY_VISION), projection_dim=32, findings=["pleural effusion"],
                  text_config=ONE_LAYER_TEXT)
    # glibc raises its mmap threshold when a mapped block is freed, so later blocks of that size come from the heap,
    # which keeps freed pages: over the last 250 findings resident memory moved by -3 to +34 MB with no live growth.
    # A fixed threshold maps and unmaps every block of 64 KiB or more directly, so resident memory follows what is
    # alive: the last 250 findings add 0.2-0.3 MiB. (glibc only; elsewhere the variable is ignored.)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, "-c", MEMO_RUN, json.dumps(config), str(budget)], capture_output=True,
                         text=True, check=True, timeout=600, env=env)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    mib = {key: value / 2**20 for key, value in measured.items() if key != "entries"}
    print(f"\n500 new findings, memo budget {budget / 2**20:.0f} MiB: memo at most {mib['largest_memo']:.2f} MiB, "
          f"live tensors +{mib['tensor_growth']:.1f} MiB, resident +{mib['resident_growth']:.1f} MiB "
          f"(the last 250 findings: +{mib['resident_growth_last_250']:.1f} MiB)")
    # 500 findings x 59 prompts x 1.5 KB of vectors: 45 MB held without a bound, of which the last 250 add 25 MB
    # (measured with max_bytes 1e9); within the budget they add under 0.5 MB.
    assert measured["largest_memo"] <= budget
    assert measured["tensor_growth"] <= budget  # tensors held anywhere else (the memo's table is allocated once)
    assert measured["resident_growth_last_250"] <= budget + 4 * 2**20
    assert measured["entries"] < 500 * 59


def test_first_interpret_of_a_saved_checkpoint_runs_no_text_tower_for_its_findings(checkpoint, chest_like_image):
    folder, model, processor = checkpoint
    expected = model.interpret(chest_like_image, processor)[0]
    with safe_open(folder / PROMPT_EMBEDS_NAME, "pt") as saved:
        texts = json.loads(saved.metadata()["texts"])
        assert saved.get_tensor("text_tower_embeds").shape == (len(texts), model.config.text_config.hidden_size)
    assert len(texts) == len(FINDINGS) * (1 + 2 * len(model.config.region_names))

    loaded = AnatomyVLMModel.from_pretrained(folder).eval()
    forbid_text_tower(loaded)
    result = loaded.interpret(chest_like_image, AnatomyVLMProcessor.from_pretrained(folder))[0]
    assert loaded.prompt_memo.num_pinned == len(texts)
    for finding in FINDINGS:
        assert result["findings"][finding] == pytest.approx(expected["findings"][finding], abs=1e-6)
    with pytest.raises(ForbiddenTower):  # any other text still needs the tower
        loaded.interpret(chest_like_image, processor, findings=["rib fracture"])


def test_precomputed_prompts_of_another_text_encoder_are_ignored(checkpoint, chest_like_image):
    folder, model, processor = checkpoint
    loaded = AnatomyVLMModel.from_pretrained(folder).eval()
    with torch.no_grad():
        loaded.text_model.embeddings.word_embeddings.weight.mul_(1.01)  # another tower
    forbid_text_tower(loaded)
    with pytest.raises(ForbiddenTower):  # the file does not match: its vectors are not used
        loaded.interpret(chest_like_image, processor)
    assert loaded.prompt_memo.num_pinned == 0


def test_save_final_writes_the_prompt_embeddings(tmp_path, chest_like_image):
    from accelerate import Accelerator

    from train.engine.checkpoint import save_final

    torch.manual_seed(0)
    config = tiny_config(findings=FINDINGS)
    model, processor = AnatomyVLMModel.from_encoders(config).eval(), AnatomyVLMProcessor.from_model_config(config)
    save_final(Accelerator(cpu=True), model, processor, tmp_path, lora=False)
    loaded = AnatomyVLMModel.from_pretrained(tmp_path / "model").eval()
    forbid_text_tower(loaded)
    assert len(loaded.interpret(chest_like_image, processor)[0]["findings"]) == len(FINDINGS)


LOADER = BLOCK_PROJECT_IMPORTS + textwrap.dedent(
    """
    import json
    import numpy as np
    from transformers import AutoModel, AutoProcessor

    checkpoint, out_path = sys.argv[1:3]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the text tower ran")

    model.text_model.forward = forbidden
    result = model.interpret(np.full((80, 64), 0.5, dtype=np.float32), processor)[0]
    json.dump({"module": type(model).__module__, "pinned": model.prompt_memo.num_pinned,
               "findings": result["findings"]}, open(out_path, "w"))
    """
)


def test_precomputed_prompts_are_used_through_trust_remote_code_without_the_project(checkpoint, tmp_path):
    folder, model, processor = checkpoint
    assert (folder / "prompt_memo_anatomy_vlm.py").is_file()  # shipped with the model code
    out_path = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", LOADER, str(folder), str(out_path)], cwd=tmp_path, env=env, check=True,
                   timeout=300)
    loaded = json.loads(out_path.read_text())
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["pinned"] == len(FINDINGS) * (1 + 2 * len(model.config.region_names))
    expected = model.interpret(np.full((80, 64), 0.5, dtype=np.float32), processor)[0]["findings"]
    assert loaded["findings"] == pytest.approx(expected, abs=1e-6)
