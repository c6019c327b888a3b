"""The GPU benchmarks run end to end on the CPU at tiny sizes (train.bench.step, train.bench.data)."""

import json
import math

import numpy as np
import pytest
import torch

from modeling_anatomy_vlm import AnatomyVLMImageProcessor
from train.bench import data as bench_data
from train.bench import step as bench

TINY = "tiny:64:16:64:2:4"  # 64 px, patch 16, hidden 64, 2 layers, 4 heads, mlp 256


def test_train_step_benchmark_runs_bare_and_full(tmp_path, capsys):
    report = bench.main(["--device", "cpu", "--configs", TINY, "--batch-size", "2", "--steps", "2", "--warmup", "1",
                         "--texts-per-image", "5", "--no-compile", "--threads", "1",
                         "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(report))
    assert report["peak_tflops"] > 0
    rows = {r["model"]: r for r in report["results"]}
    assert set(rows) == {"bare", "full"} and all(not r["compiled"] for r in rows.values())
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_memory_bytes"] > 0
        assert len(row["step_ms_all"]) == 2
    full = rows["full"]
    assert set(full["losses"]) == {"anatomy", "global", "fine", "region"}  # the stage-3 step ran every loss
    assert all(math.isfinite(v) for v in full["losses"].values())
    assert full["full_over_bare"] == pytest.approx(full["images_per_s"] / rows["bare"]["images_per_s"])
    assert full["flops_per_step"] > rows["bare"]["flops_per_step"]
    table = capsys.readouterr().out
    assert "full/bare" in table and f"{full['full_over_bare']:.3f}" in table


def test_bare_vit_flops_match_the_analytic_count():
    """FlopCounterMode, with the CPU attention kernel mapped, gives the analytic count of BENCHMARKS.md: per image
    3 x matmul (forward, input and weight gradients) + 2 x patch convolution (no input gradient) + 3.5 x attention
    (PyTorch counts the flash backward as 2.5 forwards: it recomputes the scores)."""
    spec = bench.VisionSpec.parse(TINY)
    config = bench.AnatomyVLMConfig(vision_config=spec.vision_config(), projection_dim=32)
    model = bench.BareViT(config)
    optimizer = torch.optim.AdamW(model.parameters())
    batch = {"pixel_values": torch.randn(2, 3, 64, 64), "labels": torch.tensor([1, 2])}
    autocast = bench.autocast_for(torch.device("cpu"), bf16=False)
    step = bench.make_step(bench.bare_loss_fn(model, batch, autocast), model, optimizer)
    counted = bench.count_flops(step, model.vision_model)

    d, m, layers = spec.hidden_size, spec.mlp_size, spec.num_layers
    patches = (spec.image_size // spec.patch_size) ** 2
    tokens = 1 + patches + config.num_anatomy_queries
    matmul = layers * 2 * tokens * (4 * d * d + 2 * d * m) + 2 * d * bench.BARE_CLASSES
    attention = layers * 4 * tokens**2 * d
    patch_conv = 2 * patches * 3 * spec.patch_size**2 * d
    assert counted == pytest.approx(2 * (3 * matmul + 2 * patch_conv + 3.5 * attention), rel=1e-3)


def test_config_specs():
    assert bench.VisionSpec.parse("vit-b16-224") == bench.VisionSpec("vit-b16-224", 224, 16, 768, 12, 12, 3072)
    assert bench.VisionSpec.parse("vit-s16-448").hidden_size == 384
    assert bench.VisionSpec.parse("x:32:8:16:1:2:48").mlp_size == 48
    with pytest.raises(ValueError, match="neither a preset"):
        bench.VisionSpec.parse("vit-l16-224")


def test_full_batch_masks_follow_the_collator():
    config = bench.AnatomyVLMConfig(vision_config=bench.VisionSpec.parse(TINY).vision_config(), projection_dim=32)
    batch = bench.full_batch(config, 3, 4, torch.Generator().manual_seed(0))
    positive, negative = batch["phrase_positive_mask"], batch["phrase_negative_mask"]
    assert positive.shape == negative.shape == (3, config.num_anatomy_queries, 12)
    assert (positive.sum((0, 1)) == 1).all()  # each text describes one region of one image
    assert not (positive & negative).any()
    assert batch["phrase_text_embeds"].shape == (12, config.text_config.hidden_size)


def test_data_benchmark_runs_on_cpu(tmp_path):
    results = bench_data.main(["--device", "cpu", "--n", "3", "--source-size", "256", "--image-size", "64",
                               "--batch-size", "2", "--workers", "0", "--warmup", "1", "--batches", "2",
                               "--threads", "1", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "d.json")])
    assert {r["variant"] for r in results} == {"loader-pil", "loader-tv"}  # nvjpeg needs CUDA
    assert all(r["images_per_s"] > 0 for r in results)
    assert len(list((tmp_path / "phantom-256px-seed0").glob("*.jpg"))) == 3
    assert json.loads((tmp_path / "d.json").read_text())["results"] == results


def test_gpu_geometry_matches_the_processor():
    """`resize_pad_normalise` (the nvjpeg variant's GPU code) gives the processor's pixels, here on the CPU."""
    rng = np.random.default_rng(0)
    processor = AnatomyVLMImageProcessor(size=64)
    images = []
    for shape in ((120, 90), (80, 130)):
        gray = rng.integers(0, 256, shape, dtype=np.uint8)
        images.append(torch.from_numpy(gray)[None])
    ours = bench_data.resize_pad_normalise(images, processor)
    reference = processor([image[0].numpy() for image in images])["pixel_values"]
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
