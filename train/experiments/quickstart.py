"""`make quickstart`: phantom data -> three-stage training on this machine -> evaluation -> a loadable checkpoint.

    python -m train.experiments.quickstart [--config configuration/train/quickstart.yaml] [--set key=value ...] [--fresh]

1. generates the phantom set named in the config (kept for later runs),
2. trains the small default model through all three stages (`train.engine`; an interrupted run resumes from its
   last checkpoint, a finished one with the same config is reused),
3. calibrates it (`train.eval.calibration`): Platt scaling of its probabilities on the phantom validation split,
   out-of-distribution statistics of the training images; `model/calibration.safetensors`, which `interpret` applies
   (a reused model keeps a calibration that still matches it),
4. evaluates it on the held-out phantom test split (`train.eval.zero_shot`) and writes
   `outputs/quickstart/eval.json`, then prints a summary table and one interpreted image. Beside the trained-prompt
   metrics: the same classes with prompts worded unlike any training text, and the findings the config withholds
   from training (`data.unseen_findings`) scored by name (`evaluate_checkpoint`).

Settings are chosen on the validation split: `eval.json` and the table carry its metrics (from the calibration
pass, no extra inference) beside the test split's, which is evaluated once, at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from train.config import DEFAULT_CONFIG, load_config, resolve_path
from train.engine import train
from train.engine.checkpoint import latest_checkpoint, trained_with
from train.eval.calibration import calibrate_checkpoint, format_report
from train.eval.zero_shot import evaluate_checkpoint, format_number, load_checkpoint

# The acceptance targets of the quickstart (issue: training); printed next to the measured values.
TARGETS = {"detection_miou": 0.70, "global_auc_macro": 0.85, "region_auc_macro": 0.80}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="discard earlier outputs and train from scratch")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = load_config(args.config, args.overrides)
    cfg = config.to_dict()
    output_dir = resolve_path(config.training.output_dir)
    model_dir = output_dir / "model"
    if args.fresh:
        shutil.rmtree(output_dir, ignore_errors=True)

    same_config = trained_with(output_dir, cfg)
    if same_config and (model_dir / "model.safetensors").is_file():
        print(f"quickstart: {model_dir} was trained with this config; evaluating it (--fresh retrains)")
    else:
        resume = "latest" if same_config and latest_checkpoint(output_dir) else None
        if not same_config and output_dir.exists():
            shutil.rmtree(output_dir)  # outputs of another config must not be mixed with this run's
        train(config, resume=resume)
    trained = time.perf_counter()

    calibration = calibrate_checkpoint(model_dir, config.data, train_split=config.data.train_split,
                                       val_split=config.data.val_split,
                                       unmentioned_as_negative=config.data.unmentioned_as_negative)
    print(f"\n{format_report(calibration)}")
    metrics = evaluate_checkpoint(model_dir, config.data, "test",
                                  unmentioned_as_negative=config.data.unmentioned_as_negative,
                                  unseen_findings=config.data.unseen_findings)
    metrics["train_seconds"] = round(trained - start, 1)
    metrics["calibration"] = {key: calibration[key] for key in ("validation_ece", "platt", "ood")}
    metrics["validation"] = calibration["validation_metrics"]
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    (output_dir / "eval.json").write_text(json.dumps(metrics, indent=2))

    validation = metrics["validation"]
    print(f"\nAnatomy-VLM quickstart: phantom validation split ({validation['num_images']} images, where settings "
          f"are chosen) and held-out test split ({metrics['num_images']} images, evaluated once)")
    print(f"{'metric':<20} {'validation':>10} {'test':>8} {'target':>8}")
    for name, target in TARGETS.items():
        value = metrics[name]
        shown = "n/a" if value is None else f"{value:.3f}"
        seen = "n/a" if validation[name] is None else f"{validation[name]:.3f}"
        print(f"{name:<20} {seen:>10} {shown:>8} {'>= ' + format(target, '.2f'):>8}  "
              f"{'ok' if value and value >= target else 'BELOW'}")
    print("zero-shot beside the trained prompts (test):")
    print(f"  prompts worded unlike any training text: global AUC "
          f"{format_number(metrics['global_auc_macro_heldout_wording'])}, anatomy-wise AUC "
          f"{format_number(metrics['region_auc_macro_heldout_wording'])}")
    if config.data.unseen_findings:
        print(f"  findings withheld from training ({', '.join(config.data.unseen_findings)}), scored by name: global AUC "
              f"{format_number(metrics['global_auc_macro_unseen_findings'])}")
    if metrics["undefined_global"]:
        print(f"(no positives in the test split, left out of global_auc_macro: {', '.join(metrics['undefined_global'])})")
    print(f"time: training {metrics['train_seconds']:.0f} s, total {metrics['total_seconds']:.0f} s")
    print(f"model + processor: {model_dir}   metrics: {output_dir / 'eval.json'}")

    model, processor = load_checkpoint(model_dir)
    from train.data.registry import load_finding_split

    example = load_finding_split(config.data, "test", model.config.region_names, model.config.findings)[0]
    findings = ["pleural effusion", "pneumothorax", "enlarged cardiac silhouette"]
    result = model.interpret(example["image"]["path"], processor, findings=findings)[0]
    print(f"\ninterpret({Path(example['image']['path']).name}), 6 of 29 regions:")
    print(f"{'region':<26} {'box (x1, y1, x2, y2)':<24} " + " ".join(f"{f[:12]:>12}" for f in findings))
    for region in result["regions"][:: 5]:
        box = ", ".join(f"{v:.0f}" for v in region["box"])
        print(f"{region['name']:<26} {box:<24} " + " ".join(f"{region['scores'][f]:>12.3f}" for f in findings))
    print("global: " + ", ".join(f"{f} {p:.3f}" for f, p in result["findings"].items()))
    ood = result["ood"]
    print(f"out-of-distribution score {ood['score']:.2f} (threshold {ood['threshold']:.2f}): "
          f"{'WARNING, unlike the training images' if ood['warning'] else 'like the training images'}")
    print("report: " + " ".join(example["report"].split())[:300])
    return metrics


if __name__ == "__main__":
    main()
