"""Evaluate `train.labels.parse_report` on the hand-labelled sentences in `train/data/report_sentences.jsonl`.

Run from the repository root:  python -m train.eval_report_parser   (or  python train/eval_report_parser.py)

The set was written for this project (not copied from any dataset) and labelled before the parser was
written. Each line: {"text", "split": "dev" | "test" | "fresh", "mentions": [{"finding", "present", "region"}]}.
"dev" (138 sentences) was used while developing the parser; "test" (43) was held out until the parser
was done; "fresh" (32 harder sentences) was written and labelled after that, measured once untuned
(triples P 0.951 / R 0.867), and its four errors were then fixed with general rules, so it is now dev data too.

Annotation guide (what the gold labels mean):
- Only findings of the parser's vocabulary (DEFAULT_FINDINGS) are labelled; devices, lines and other
  findings are out of scope. Uncertain findings ("possible X") are labelled present; negated or resolved
  findings and removed tubes are absent. "No significant change in X" means X is present.
- Normal statements naming no finding ("the lungs are clear", "no acute process") carry no label;
  "heart size is normal" / "no cardiomegaly" is enlarged cardiac silhouette, absent.
- Regions follow train.labels.REGION_RULES: effusion/blunting -> "{side} costophrenic angle"; lung
  findings -> the zone named ("basilar" -> lower lung zone, "lingula" -> left mid lung zone, "retrocardiac"
  -> left lower lung zone, "perihilar" -> hilar structures; a zone without a side -> both sides), else
  "{side} lung", else null; cardiomegaly -> cardiac silhouette; hernia -> mediastinum; spine findings ->
  spine; tortuous aorta -> aortic arch; ETT -> trachea; enteric tube -> abdomen. A finding given as an
  interpretation of a located one ("opacity in the left base, likely atelectasis") or adjacent to it
  ("effusion with adjacent atelectasis") shares its location. Indication/comparison sections are ignored.
- Scores are over de-duplicated (finding, present, region) triples per sentence, and over (finding,
  present) pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.labels import parse_report  # noqa: E402

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "report_sentences.jsonl"


@dataclass
class Scores:
    true_positives: int = 0
    predicted: int = 0
    gold: int = 0

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.gold if self.gold else 1.0

    def add(self, predicted: set, gold: set):
        self.true_positives += len(predicted & gold)
        self.predicted += len(predicted)
        self.gold += len(gold)


@dataclass
class Evaluation:
    """Triple scores (finding, present, region) and pair scores (finding, present), per split and "all"."""

    triples: dict[str, Scores] = field(default_factory=dict)
    pairs: dict[str, Scores] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)  # {"split", "text", "missing", "spurious"}


def load_sentences(path: str | Path = DEFAULT_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def evaluate(path: str | Path = DEFAULT_PATH) -> Evaluation:
    result = Evaluation()
    for item in load_sentences(path):
        split = item.get("split", "dev")
        gold = {(m["finding"], m["present"], m["region"]) for m in item["mentions"]}
        predicted = {(m.finding, m.present, m.region) for m in parse_report(item["text"])}
        for key in (split, "all"):
            result.triples.setdefault(key, Scores()).add(predicted, gold)
            result.pairs.setdefault(key, Scores()).add({t[:2] for t in predicted}, {t[:2] for t in gold})
        if predicted != gold:
            result.errors.append({
                "split": split, "text": item["text"],
                "missing": sorted(gold - predicted, key=str), "spurious": sorted(predicted - gold, key=str),
            })
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Precision/recall of parse_report on hand-labelled sentences.")
    parser.add_argument("path", nargs="?", default=str(DEFAULT_PATH))
    parser.add_argument("--errors-of", default=None, help="list only the errors of this split (dev/test)")
    args = parser.parse_args(argv)
    result = evaluate(args.path)
    print(f"{'split':<6} {'unit':<26} {'precision':>9} {'recall':>7} {'gold':>5} {'pred':>5}")
    for split in sorted(result.triples, key=lambda s: (s == "all", s)):
        for unit, scores in (("(finding, present, region)", result.triples[split]), ("(finding, present)", result.pairs[split])):
            print(f"{split:<6} {unit:<26} {scores.precision:>9.3f} {scores.recall:>7.3f} {scores.gold:>5} {scores.predicted:>5}")
    print(f"\n{len(result.errors)} sentence(s) with errors")
    for error in (e for e in result.errors if args.errors_of in (None, e["split"])):
        print(f"[{error['split']}] {error['text']}\n    missing:  {error['missing']}\n    spurious: {error['spurious']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
