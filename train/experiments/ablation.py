"""Objective ablation of the last stage: which of its losses the anatomy-wise scores come from, against an image-blind floor.

    python -m train.experiments.ablation [--config configuration/train/quickstart.yaml] [--set key=value ...]
                             [--steps-fraction 0.667] [--out outputs/ablation] [--variants none fine ...]
                             [--bootstrap 200]

Every variant shares the config's stages before the last one: they are trained once (``<out>/prefix``, stopped at the
end of the next-to-last stage) and each variant continues from that checkpoint, optimizer and data order included.
The variants differ only in the last stage, which keeps the config's steps, learning rate, warmup, batch size and
seed; of its losses each variant keeps the ones it names, at their configured weights:

    none           anatomy + global                  the detection and global objectives alone
    fine           anatomy + global + fine           + the paper's region-phrase InfoNCE (L_fine)
    region         anatomy + global + region         + the prompt-pair loss on the region labels
    both           anatomy + global + fine + region  the config's last stage (quickstart)
    image-blind    as both, each image swapped for another of its batch (`shuffle_images`): the floor that text
                   and label priors reach without pixels

The `region` term puts a loss on exactly the prompt-pair log-odds that the anatomy-wise AUC reads, so its rows
measure a supervised head; the held-out wording column scores the same classes with prompts worded unlike any
training text (`train.eval.zero_shot.HELDOUT_WORDING`). By default each stage trains 2/3 of the config's steps
(`--steps-fraction`). Each variant is evaluated once on the held-out test split of the config's data root
(`train.eval.zero_shot.run_evaluation`; thresholds from the validation split).

Outputs in ``--out``: ``prefix/`` (the shared stages), ``<variant>/`` (each training output_dir, with
``evaluation/imagenome-test/metrics.json`` and plots), ``ablation.json`` (every row) and ``ablation.md``, the table
generated from that JSON (`markdown_table`; README's table is this file). A variant already trained with the same
derived config is evaluated again without retraining.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

from train.config import DEFAULT_CONFIG, REPO_ROOT, from_dict, load_config
from train.engine import train
from train.engine.checkpoint import latest_checkpoint, read_state, trained_with
from train.eval.zero_shot import run_evaluation

# variant name -> (table label, losses of the last stage it keeps besides anatomy and global, images shuffled)
VARIANTS = {
    "none": ("global + detection", (), False),
    "fine": ("+ L_fine", ("fine",), False),
    "region": ("+ region", ("region",), False),
    "both": ("+ L_fine + region", ("fine", "region"), False),
    "image-blind": ("+ L_fine + region, image-blind", ("fine", "region"), True),
}
SHARED_LOSSES = ("anatomy", "global")


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


def prefix_config(cfg: dict, output_dir) -> dict:
    """`cfg` stopped after its next-to-last stage (`training.stop_after_steps`), in its own output_dir."""
    derived = copy.deepcopy(cfg)
    derived["training"]["output_dir"] = str(output_dir)
    derived["training"]["stop_after_steps"] = sum(int(stage["steps"]) for stage in derived["stages"][:-1])
    return derived


def variant_config(cfg: dict, name: str, output_dir) -> dict:
    """`cfg` whose last stage keeps the shared losses and the variant's (at their configured weights)."""
    _, extra, shuffle = VARIANTS[name]
    derived = copy.deepcopy(cfg)
    derived["training"]["output_dir"] = str(output_dir)
    last = derived["stages"][-1]
    configured = last.get("loss_weights", {})
    missing = [loss for loss in extra if configured.get(loss, 0) <= 0]
    if missing:
        raise ValueError(f"variant {name!r}: the config's last stage has no weight for {missing}; give it one")
    last["loss_weights"] = {loss: w for loss, w in configured.items() if loss in SHARED_LOSSES + extra and w > 0}
    last["shuffle_images"] = shuffle
    return derived


def train_prefix(cfg: dict) -> Path:
    """Train (or reuse, or resume) the shared stages; returns the checkpoint at their end."""
    output_dir = Path(cfg["training"]["output_dir"])
    stop = cfg["training"]["stop_after_steps"]
    checkpoint = latest_checkpoint(output_dir) if trained_with(output_dir, cfg) else None
    if checkpoint is not None and read_state(checkpoint)["global_step"] == stop:
        print(f"ablation: {checkpoint} holds the shared stages of this config; reusing it")
        return checkpoint
    if checkpoint is None and output_dir.exists():
        shutil.rmtree(output_dir)  # outputs of another config must not be mixed with this run's
    train(from_dict(copy.deepcopy(cfg)), resume="latest" if checkpoint is not None else None)
    return latest_checkpoint(output_dir)


def train_variant(cfg: dict, prefix: Path) -> Path:
    """Train (or reuse) one variant's last stage from the shared checkpoint `prefix`; returns its model folder.

    The prefix's text cache is copied in (the frozen text tower and texts are the same in every variant;
    `TextEmbeddingCache.load_or_build` still checks the encoder fingerprint and embeds any text it lacks)."""
    output_dir = Path(cfg["training"]["output_dir"])
    model_dir = output_dir / "model"
    if trained_with(output_dir, cfg) and (model_dir / "model.safetensors").is_file():
        print(f"ablation: {model_dir} was trained with this config; reusing it")
        return model_dir
    shutil.rmtree(output_dir, ignore_errors=True)
    start = output_dir / "checkpoints" / prefix.name
    shutil.copytree(prefix, start)
    if (prefix.parent.parent / "text_cache" / "manifest.json").is_file():
        shutil.copytree(prefix.parent.parent / "text_cache", output_dir / "text_cache")
    train(from_dict(copy.deepcopy(cfg)), resume=str(start))
    return model_dir


def _cell(value, interval=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def summarise(name: str, cfg: dict, metrics: dict) -> dict:
    """The row of one variant, from its `run_evaluation` metrics."""
    detection, region, laterality = metrics["detection"] or {}, metrics["region"] or {}, metrics["laterality"] or {}
    reworded = metrics["heldout_wording"]
    last = cfg["stages"][-1]
    return {
        "variant": name,
        "label": VARIANTS[name][0],
        "last_stage": {"name": last["name"], "steps": last["steps"], "loss_weights": last["loss_weights"],
                       "shuffle_images": last["shuffle_images"]},
        "shared_stages": [{"name": s["name"], "steps": s["steps"], "loss_weights": s["loss_weights"]}
                          for s in cfg["stages"][:-1]],
        "global_auc": metrics["global"]["macro"]["auc"],
        "global_auc_ci95": (metrics["global"]["ci95"] or {}).get("auc"),
        "detection_miou": detection.get("miou"),
        "region_auc": (region.get("macro") or {}).get("auc"),
        "region_auc_ci95": (region.get("ci95") or {}).get("auc"),
        "region_auc_heldout_wording": reworded["region_auc_macro"],
        "region_auc_heldout_wording_ci95": reworded["region_auc_ci95"],
        "laterality_accuracy": laterality.get("accuracy"),
        "laterality_ci95": laterality.get("ci95"),
        "laterality_trials": laterality.get("num_trials"),
        "validation": {key: (metrics["validation"] or {}).get(key)
                       for key in ("num_images", "global_auc_macro", "region_auc_macro", "detection_miou")},
        "metrics": str(Path(metrics["out_dir"]) / "metrics.json"),
    }


def markdown_table(result: dict) -> str:
    """The table of `ablation.json` (its dict), as README shows it."""
    rows = result["variants"]
    shared = " / ".join(f"{'+'.join(s['loss_weights'])} ({s['steps']})" for s in rows[0]["shared_stages"])
    lines = [
        "| last stage | losses ({} steps) | global AUC | mIoU | anatomy-wise AUC | anatomy-wise AUC, held-out wording | "
        "laterality acc. |".format(rows[0]["last_stage"]["steps"]),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        weights = row["last_stage"]["loss_weights"]
        losses = " + ".join(f"{name} {weight:g}" for name, weight in weights.items())
        lines.append(
            f"| {row['label']} | {losses}{', images shuffled' if row['last_stage']['shuffle_images'] else ''} | "
            f"{_cell(row['global_auc'], row['global_auc_ci95'])} | {_cell(row['detection_miou'])} | "
            f"{_cell(row['region_auc'], row['region_auc_ci95'])} | "
            f"{_cell(row['region_auc_heldout_wording'], row['region_auc_heldout_wording_ci95'])} | "
            f"{_cell(row['laterality_accuracy'], row['laterality_ci95'])} (n={row['laterality_trials']}) |")
    validation = rows[0]["validation"]["num_images"]
    lines += ["", f"Validation split ({validation} images, where choices are made): global AUC / anatomy-wise AUC / "
                  "mIoU: " + "; ".join(
                      f"{row['label']} {_cell(row['validation']['global_auc_macro'])} / "
                      f"{_cell(row['validation']['region_auc_macro'])} / {_cell(row['validation']['detection_miou'])}"
                      for row in rows)]
    return (f"Held-out test split of `{result['data_root']}` ({result['num_images']} images, evaluated once per "
            f"variant); shared stages: {shared}. 95 % bootstrap intervals over images in brackets. "
            f"Generated by `python -m train.experiments.ablation` from `ablation.json`.\n\n" + "\n".join(lines) + "\n")


def run_ablation(cfg: dict, out_dir, variants=tuple(VARIANTS), n_bootstrap: int = 200, plots: bool = True,
                 progress: bool = True) -> dict:
    """Train and evaluate each variant; writes ``ablation.json`` and ``ablation.md`` into `out_dir`."""
    if cfg.get("task", "anatomy_vlm") != "anatomy_vlm":
        raise ValueError(f"the ablation compares the anatomy_vlm objectives; the config's task is {cfg['task']!r}")
    if len(cfg["stages"]) < 2:
        raise ValueError("the ablation varies the last stage after shared ones: the config needs at least two stages")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    out_dir = Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = REPO_ROOT / out_dir
    data_root = Path(cfg["data"]["root"])
    data_root = data_root if data_root.is_absolute() else REPO_ROOT / data_root
    derived = {name: variant_config(cfg, name, out_dir / name) for name in variants}  # refuses a bad config early
    prefix = train_prefix(prefix_config(cfg, out_dir / "prefix"))
    rows = []
    for name in variants:
        print(f"ablation: {VARIANTS[name][0]}: last stage {derived[name]['stages'][-1]['loss_weights']}"
              f"{' (images shuffled)' if VARIANTS[name][2] else ''}")
        model_dir = train_variant(derived[name], prefix)
        metrics = run_evaluation(model_dir, data_root, dataset="imagenome", split="test", n_bootstrap=n_bootstrap,
                                 unmentioned_as_negative=cfg["data"].get("unmentioned_as_negative", True),
                                 plots=plots, progress=progress)
        rows.append(summarise(name, derived[name], metrics))
    result = {"data_root": cfg["data"]["root"], "num_images": metrics["num_images"], "variants": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "ablation.md").write_text(markdown_table(result))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every variant, e.g. --set stages.2.steps=100")
    parser.add_argument("--steps-fraction", type=float, default=2 / 3,
                        help="each stage trains this fraction of the config's steps (default 2/3; 1 = the config's)")
    parser.add_argument("--out", default="outputs/ablation")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% CIs (0 = none)")
    parser.add_argument("--no-plots", action="store_true", help="skip the per-variant evaluation plots")
    args = parser.parse_args(argv)
    cfg = scale_steps(load_config(args.config, args.overrides).to_dict(), args.steps_fraction)
    out_dir = Path(args.out) if Path(args.out).is_absolute() else REPO_ROOT / args.out
    result = run_ablation(cfg, out_dir, args.variants, args.bootstrap, plots=not args.no_plots)
    print((out_dir / "ablation.md").read_text())
    return result


if __name__ == "__main__":
    main()
