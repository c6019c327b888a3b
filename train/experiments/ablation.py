"""Objective ablation with one training budget: global only, detection only, global + detection, all three.

    python -m train.experiments.ablation [--config configuration/train/quickstart.yaml] [--set key=value ...]
                             [--steps-fraction 0.667] [--out outputs/ablation] [--variants global detection ...]
                             [--bootstrap 200]

Same budget, honestly: every variant trains from the same config with the same stages (steps, learning rate,
warmup, so the same learning-rate schedule), batch size, data, image order and seed; only the losses differ.
A variant enables a set of losses; each stage keeps the losses of the config that the variant enables, at their
configured weights, and a stage left with none (stage 1, detection only, in the global-only variant) trains
the variant's losses at weight 1.0 for its steps instead, so no variant trains fewer steps. By default every
stage runs 2/3 of the config's steps (`--steps-fraction`), so the four trainings cost as much as 2.7 trainings
of the config; with the quickstart config (detection 100 / detection + global 367 / all 600 steps):

    global only          global     | global              | global
    detection only       anatomy    | anatomy             | anatomy
    global + detection   anatomy    | anatomy + global    | anatomy + global
    + fine-grained       anatomy    | anatomy + global    | anatomy + global + fine + region (the config)

A head whose loss is off gets no training signal of its own (the box head in "global only", the region
projection without the fine-grained loss), so its metrics stay near chance; they are reported as measured.
Each variant is evaluated on the held-out test split of the config's data root with `train.eval.zero_shot`
(thresholds from the validation split, saved with each model). Cost: four trainings of the config.

Outputs in ``--out``: ``<variant>/`` (the training output_dir: model/ with its thresholds.json, logs, text cache;
``evaluation/imagenome-test/`` with metrics.json and plots), ``ablation.md`` (the table) and ``ablation.json``.
A variant already trained with the same derived config is evaluated again without retraining; an interrupted
one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import yaml


from train.config import DEFAULT_CONFIG, REPO_ROOT, from_dict, load_config
from train.engine import train
from train.engine.checkpoint import latest_checkpoint
from train.eval.zero_shot import run_evaluation

# variant name -> (table label, enabled losses in `train.config.LOSSES` names)
VARIANTS = {
    "global": ("global only", ("global",)),
    "detection": ("detection only", ("anatomy",)),
    "global+detection": ("global + detection", ("anatomy", "global")),
    "all": ("global + detection + fine-grained", ("anatomy", "global", "fine", "region")),
}


def scale_steps(cfg: dict, fraction: float) -> dict:
    """`cfg` with every stage's steps (and warmup, where it would not fit) scaled by `fraction`, at least 1 step."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--steps-fraction must be in (0, 1], got {fraction}")
    scaled = copy.deepcopy(cfg)
    for stage in scaled["stages"]:
        stage["steps"] = max(1, round(stage["steps"] * fraction))
        if "warmup_steps" in stage:
            stage["warmup_steps"] = min(stage["warmup_steps"], stage["steps"])
    return scaled


def variant_config(cfg: dict, losses, output_dir) -> dict:
    """`cfg` with only `losses` switched on in each stage (see the module docstring) and its own output_dir."""
    derived = copy.deepcopy(cfg)
    derived["training"]["output_dir"] = str(output_dir)
    for stage in derived["stages"]:
        configured = stage.get("loss_weights", {})
        kept = {name: weight for name, weight in configured.items() if name in losses and weight > 0}
        stage["loss_weights"] = kept or {name: 1.0 for name in losses}
    return derived


def train_variant(cfg: dict, text_cache: Path | None = None) -> Path:
    """Train (or reuse, or resume) one variant; returns its model folder.

    `text_cache`: another variant's ``text_cache/`` folder. The frozen text tower and the training texts are the same in
    every variant, so the folder is copied in rather than rebuilt (`TextEmbeddingCache.load_or_build` still checks
    the encoder fingerprint and embeds any text it lacks).
    """
    output_dir = Path(cfg["training"]["output_dir"])
    model_dir = output_dir / "model"
    saved = output_dir / "train_config.yaml"
    same_config = saved.is_file() and yaml.safe_load(saved.read_text()) == cfg
    if same_config and (model_dir / "model.safetensors").is_file():
        print(f"ablation: {model_dir} was trained with this config; reusing it")
        return model_dir
    resume = "latest" if same_config and latest_checkpoint(output_dir) else None
    if not same_config and output_dir.exists():
        shutil.rmtree(output_dir)  # outputs of another config must not be mixed with this run's
    target = output_dir / "text_cache"
    if text_cache is not None and (text_cache / "manifest.json").is_file() and not target.exists():
        shutil.copytree(text_cache, target)
    train(from_dict(copy.deepcopy(cfg)), resume=resume)
    return model_dir


def stages_text(stages) -> str:
    """"anatomy (300) / anatomy+global (200) / ...": the losses and steps of each stage."""
    return " / ".join(f"{'+'.join(stage['loss_weights'])} ({stage['steps']})" for stage in stages)


def _cell(value, interval=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def summarise(name: str, cfg: dict, metrics: dict) -> dict:
    """The table row of one variant, from its `run_evaluation` metrics."""
    detection, region, laterality = metrics["detection"] or {}, metrics["region"] or {}, metrics["laterality"] or {}
    return {
        "variant": name,
        "label": VARIANTS[name][0],
        "stages": [{"name": s["name"], "steps": s["steps"], "loss_weights": s["loss_weights"]} for s in cfg["stages"]],
        "total_steps": sum(int(s["steps"]) for s in cfg["stages"]),
        "global_auc": metrics["global"]["macro"]["auc"],
        "global_auc_ci95": (metrics["global"]["ci95"] or {}).get("auc"),
        "detection_map": detection.get("map"),
        "detection_map_ci95": (detection.get("ci95") or {}).get("map"),
        "detection_miou": detection.get("miou"),
        "region_auc": (region.get("macro") or {}).get("auc"),
        "region_auc_ci95": (region.get("ci95") or {}).get("auc"),
        "laterality_accuracy": laterality.get("accuracy"),
        "laterality_ci95": laterality.get("ci95"),
        "laterality_trials": laterality.get("num_trials"),
        "metrics": str(Path(metrics["out_dir"]) / "metrics.json"),
    }


def markdown_table(rows: list[dict], num_images: int, data_root) -> str:
    lines = [
        "# Objective ablation (same budget)",
        "",
        f"Held-out test split of `{data_root}` ({num_images} images); every variant trains the same "
        f"{rows[0]['total_steps']} steps on the same data and learning-rate schedule (`python -m train.experiments.ablation`). "
        "Global AUC: zero-shot macro AUC over findings; mAP: detection AP@[.5:.95] over regions (one box per "
        "region, equal scores); anatomy-wise AUC: macro over (region, finding) classes; laterality: the true "
        "side's region scores higher than its mirror. 95 % bootstrap intervals in brackets. A head whose loss is off "
        "gets no training signal of its own, so its metrics stay near chance; they are shown as measured.",
        "",
        "| variant | losses per stage (steps) | global AUC | mAP (det.) | mIoU | anatomy-wise AUC | laterality acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {stages_text(row['stages'])} | {_cell(row['global_auc'], row['global_auc_ci95'])} | "
            f"{_cell(row['detection_map'], row['detection_map_ci95'])} | {_cell(row['detection_miou'])} | "
            f"{_cell(row['region_auc'], row['region_auc_ci95'])} | "
            f"{_cell(row['laterality_accuracy'], row['laterality_ci95'])} (n={row['laterality_trials']}) |")
    return "\n".join(lines) + "\n"


def run_ablation(cfg: dict, out_dir, variants=tuple(VARIANTS), n_bootstrap: int = 200, plots: bool = True,
                 progress: bool = True) -> list[dict]:
    """Train and evaluate each variant; writes ``ablation.md`` and ``ablation.json`` into `out_dir`."""
    if cfg.get("task", "anatomy_vlm") != "anatomy_vlm":
        raise ValueError(f"the ablation compares the anatomy_vlm objectives; the config's task is {cfg['task']!r}")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    out_dir = Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = REPO_ROOT / out_dir
    data_root = Path(cfg["data"]["root"])
    data_root = data_root if data_root.is_absolute() else REPO_ROOT / data_root
    rows, text_cache = [], None
    for name in variants:
        variant_dir = out_dir / name.replace("+", "_")
        derived = variant_config(cfg, VARIANTS[name][1], variant_dir)
        print(f"ablation: {VARIANTS[name][0]}: {stages_text(derived['stages'])}")
        model_dir = train_variant(derived, text_cache)
        text_cache = text_cache or variant_dir / "text_cache"
        metrics = run_evaluation(model_dir, data_root, dataset="imagenome", split="test", n_bootstrap=n_bootstrap,
                                 unmentioned_as_negative=cfg["data"].get("unmentioned_as_negative", True),
                                 plots=plots, progress=progress)
        rows.append(summarise(name, derived, metrics))
    num_images = metrics["num_images"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.md").write_text(markdown_table(rows, num_images, cfg["data"]["root"]))
    (out_dir / "ablation.json").write_text(json.dumps({"data": str(data_root), "num_images": num_images,
                                                       "variants": rows}, indent=1) + "\n")
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every variant, e.g. --set stages.2.steps=100")
    parser.add_argument("--steps-fraction", type=float, default=2 / 3,
                        help="each stage trains this fraction of the config's steps (default 2/3: the four "
                             "trainings cost 2.7 trainings of the config; 1 = the config's full budget)")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% CIs (0 = none)")
    parser.add_argument("--no-plots", action="store_true", help="skip the per-variant evaluation plots")
    args = parser.parse_args(argv)
    cfg = scale_steps(load_config(args.config, args.overrides).to_dict(), args.steps_fraction)
    out_dir = Path(args.out) if Path(args.out).is_absolute() else REPO_ROOT / args.out
    rows = run_ablation(cfg, out_dir, args.variants, args.bootstrap, plots=not args.no_plots)
    print((out_dir / "ablation.md").read_text())
    return rows


if __name__ == "__main__":
    main()
