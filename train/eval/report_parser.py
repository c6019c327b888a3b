"""Evaluate the report parser on hand-labelled sentences, against a keyword baseline and ConText/NegEx.

    python -m train.eval.report_parser                 # the comparison table below
    python -m train.eval.report_parser --errors real-dev --system rules    # list one system's errors

TABLE
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from train.text.parser import Mention, parse_report
from train.text.vocabulary import REGIONS

DATA_DIR = Path(__file__).resolve().parents[1] / "text" / "data"
DEFAULT_PATH = DATA_DIR / "report_sentences.jsonl"
REAL_PATH = DATA_DIR / "iu_xray_real.jsonl"
REAL_DEV_LINES = 180  # the first 180 lines of iu_xray_real.jsonl are real-dev, the rest real-test
SPLITS = ("tuned", "real-dev", "real-test")
HIDDEN_ERRORS = ("real-test",)  # measured once; its errors are never listed (no tuning on it)

PRESENT, ABSENT, UNCERTAIN = "present", "absent", "uncertain"


# ---------------------------------------------------------------------------------------------------
# Sentence labels
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """One (finding, status) stated by a sentence and the side it is stated on.

    Attributes:
        finding: a `train.text.vocabulary.FINDING_CATEGORY` label.
        status: "present", "absent" or "uncertain".
        side: "right", "left", "bilateral" or None (no side, or a midline structure).
    """

    finding: str
    status: str
    side: str | None


@dataclass
class Sentence:
    text: str
    split: str
    labels: frozenset[Label]
    two_way: bool = False  # gold status is only present/absent (uncertain findings were labelled present)


def side_of(sides: Iterable[str | None]) -> str | None:
    """The side of a finding named on `sides`: both -> "bilateral"; one -> it; none -> None."""
    named = {s for s in sides if s}
    if "bilateral" in named or {"right", "left"} <= named:
        return "bilateral"
    return next(iter(named), None)


def mention_status(mention: Mention) -> str:
    if not mention.present:
        return ABSENT
    return UNCERTAIN if mention.uncertain else PRESENT


def labels_of(items: Iterable[tuple[str, str, str | None]]) -> frozenset[Label]:
    """(finding, status, side) items (one per mention) -> one Label per (finding, status), sides merged."""
    sides: dict[tuple[str, str], list[str | None]] = defaultdict(list)
    for finding, status, side in items:
        sides[(finding, status)].append(side)
    return frozenset(Label(f, s, side_of(v)) for (f, s), v in sides.items())


def labels_of_mentions(mentions: Iterable[Mention]) -> frozenset[Label]:
    return labels_of((m.finding, mention_status(m), REGIONS[m.region].side if m.region else None) for m in mentions)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def load_sentences(path: str | Path = DEFAULT_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_splits(tuned_path: str | Path = DEFAULT_PATH, real_path: str | Path = REAL_PATH) -> list[Sentence]:
    """The project's tuned set (report_sentences.jsonl, status present/absent, side from the region) and the
    real IU-Xray sentences (iu_xray_real.jsonl: first `REAL_DEV_LINES` lines real-dev, the rest real-test)."""
    sentences = []
    for item in load_sentences(tuned_path):
        labels = labels_of((m["finding"], PRESENT if m["present"] else ABSENT,
                            REGIONS[m["region"]].side if m["region"] else None) for m in item["mentions"])
        sentences.append(Sentence(item["text"], "tuned", labels, two_way=True))
    for index, item in enumerate(load_sentences(real_path)):
        split = "real-dev" if index < REAL_DEV_LINES else "real-test"
        labels = labels_of((m["finding"], m["status"], m["side"]) for m in item["mentions"])
        sentences.append(Sentence(item["text"], split, labels))
    return sentences


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Finding micro-P/R/F1 over (finding, status) per sentence, and laterality accuracy over the gold labels
    with a side whose (finding, status) was found (`side_found`), and over all found gold labels (`any_side`)."""

    true_positives: int = 0
    predicted: int = 0
    gold: int = 0
    side_correct: int = 0
    side_found: int = 0
    any_side_correct: int = 0
    any_side_found: int = 0

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.gold if self.gold else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def laterality(self) -> float:
        return self.side_correct / self.side_found if self.side_found else 1.0

    @property
    def laterality_with_null(self) -> float:
        return self.any_side_correct / self.any_side_found if self.any_side_found else 1.0

    def add(self, predicted: frozenset[Label], gold: frozenset[Label]) -> None:
        predicted_side = {(p.finding, p.status): p.side for p in predicted}
        gold_pairs = {(g.finding, g.status) for g in gold}
        self.true_positives += len(set(predicted_side) & gold_pairs)
        self.predicted += len(predicted_side)
        self.gold += len(gold_pairs)
        for g in gold:
            key = (g.finding, g.status)
            if key in predicted_side:
                self.any_side_found += 1
                self.any_side_correct += predicted_side[key] == g.side
                if g.side is not None:
                    self.side_found += 1
                    self.side_correct += predicted_side[key] == g.side


def _two_way(labels: frozenset[Label]) -> frozenset[Label]:
    """Uncertain -> present (the tuned set's convention)."""
    return labels_of((l.finding, PRESENT if l.status == UNCERTAIN else l.status, l.side) for l in labels)


@dataclass
class Evaluation:
    scores: dict[str, Scores] = field(default_factory=dict)  # split -> Scores
    errors: list[dict] = field(default_factory=list)  # {"split", "text", "missing", "spurious"}


def evaluate_system(system: Callable[[str], frozenset[Label]], sentences: list[Sentence]) -> Evaluation:
    result = Evaluation()
    for sentence in sentences:
        predicted = system(sentence.text)
        if sentence.two_way:
            predicted = _two_way(predicted)
        result.scores.setdefault(sentence.split, Scores()).add(predicted, sentence.labels)
        if predicted != sentence.labels:
            result.errors.append({
                "split": sentence.split, "text": sentence.text,
                "missing": sorted(sentence.labels - predicted, key=str), "spurious": sorted(predicted - sentence.labels, key=str),
            })
    return result


# ---------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------


def rules_system(text: str) -> frozenset[Label]:
    """`train.text.parser.parse_report`."""
    return labels_of_mentions(parse_report(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Finding F1 and laterality of the report parser and baselines.")
    parser.add_argument("--errors", default=None, choices=[s for s in SPLITS if s not in HIDDEN_ERRORS],
                        help="list the errors of this split")
    parser.add_argument("--system", default="rules", help="whose errors --errors lists")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to score")
    args = parser.parse_args(argv)
    sentences = [s for s in load_splits() if s.split in args.splits]
    systems = {"rules": rules_system}
    print(f"{'system':<22} {'split':<10} {'F1':>6} {'P':>6} {'R':>6} {'lat':>6} {'lat+null':>8} {'gold':>5} {'n_lat':>5}")
    results = {}
    for name, system in systems.items():
        results[name] = evaluate_system(system, sentences)
        for split in args.splits:
            s = results[name].scores[split]
            print(f"{name:<22} {split:<10} {s.f1:>6.3f} {s.precision:>6.3f} {s.recall:>6.3f} {s.laterality:>6.3f} "
                  f"{s.laterality_with_null:>8.3f} {s.gold:>5} {s.side_found:>5}")
    if args.errors:
        for error in (e for e in results[args.system].errors if e["split"] == args.errors):
            print(f"{error['text']}\n    missing:  {error['missing']}\n    spurious: {error['spurious']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
