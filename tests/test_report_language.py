"""Real report language: perturbations checked against hand-written expectations (not against the parser), and the
parser, perturbations and region texts run over every real IU-Xray sentence and over fuzz strings without raising."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from train.text import perturb
from train.text.parser import parse_report, split_sentences
from train.text.perturb import PERTURBERS, flip_negation, perturb_phrase, swap_laterality
from train.text.region_texts import mentions_to_region_phrases, possible_region_texts, region_texts_for_image

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------- hand-written expectations
# Each case: the text, what it means (written by reading it), and for each perturbation the rewrite we expect
# and what that rewrite means, both written by hand; None where the perturbation has nothing to change.
# A meaning is a set of (finding, status, side, severity); status is present / absent / uncertain.
ECS = "enlarged cardiac silhouette"
CASES = [
    dict(text="Pleural effusion is not seen.",
         meaning={("pleural effusion", "absent", None, None)},
         negation=("Pleural effusion is seen.", {("pleural effusion", "present", None, None)})),
    dict(text="Pneumothorax is not identified.",
         meaning={("pneumothorax", "absent", None, None)},
         negation=("Pneumothorax is identified.", {("pneumothorax", "present", None, None)})),
    dict(text="Focal consolidation was not detected.",
         meaning={("consolidation", "absent", None, None)},
         negation=("Focal consolidation was detected.", {("consolidation", "present", None, None)})),
    dict(text="A pleural effusion is not present.",
         meaning={("pleural effusion", "absent", None, None)},
         negation=("A pleural effusion is present.", {("pleural effusion", "present", None, None)})),
    dict(text="Pneumothorax is absent.",
         meaning={("pneumothorax", "absent", None, None)},
         negation=("Pneumothorax is present.", {("pneumothorax", "present", None, None)})),
    dict(text="The right pleural effusion has resolved.",
         meaning={("pleural effusion", "absent", "right", None)},
         negation=("The right pleural effusion persists.", {("pleural effusion", "present", "right", None)}),
         laterality=("The left pleural effusion has resolved.", {("pleural effusion", "absent", "left", None)})),
    dict(text="The left basilar opacity is no longer seen.",
         meaning={("lung opacity", "absent", "left", None)},
         negation=("The left basilar opacity is still seen.", {("lung opacity", "present", "left", None)}),
         laterality=("The right basilar opacity is no longer seen.", {("lung opacity", "absent", "right", None)})),
    dict(text="Both lungs are free of infiltrates.",
         meaning={("lung opacity", "absent", "bilateral", None)},
         negation=("Both lungs show infiltrates.", {("lung opacity", "present", "bilateral", None)})),
    dict(text="The lungs are clear of focal airspace disease.",
         meaning={("lung opacity", "absent", None, None)},
         negation=("The lungs show focal airspace disease.", {("lung opacity", "present", None, None)})),
    dict(text="No pleural effusions or pneumothoraces were detected.",
         meaning={("pleural effusion", "absent", None, None), ("pneumothorax", "absent", None, None)},
         negation=("Pleural effusions and pneumothoraces were detected.",
                   {("pleural effusion", "present", None, None), ("pneumothorax", "present", None, None)})),
    dict(text="NO PNEUMOTHORAX.",
         meaning={("pneumothorax", "absent", None, None)},
         negation=("PNEUMOTHORAX.", {("pneumothorax", "present", None, None)})),
    dict(text="No XXXX pneumothorax.",
         meaning={("pneumothorax", "absent", None, None)},
         negation=("XXXX pneumothorax.", {("pneumothorax", "present", None, None)})),
    dict(text="Right lower lobe pneumonia cannot be excluded.",
         meaning={("pneumonia", "uncertain", "right", None)},
         negation=("No right lower lobe pneumonia.", {("pneumonia", "absent", "right", None)}),
         laterality=("Left lower lobe pneumonia cannot be excluded.", {("pneumonia", "uncertain", "left", None)})),
    dict(text="Left basilar opacity may reflect atelectasis.",
         meaning={("lung opacity", "present", "left", None), ("atelectasis", "uncertain", "left", None)},
         negation=("No left basilar opacity.", {("lung opacity", "absent", "left", None)}),
         laterality=("Right basilar opacity may reflect atelectasis.",
                     {("lung opacity", "present", "right", None), ("atelectasis", "uncertain", "right", None)})),
    dict(text="Questionable small left pleural effusion.",
         meaning={("pleural effusion", "uncertain", "left", "mild")},
         negation=("No left pleural effusion.", {("pleural effusion", "absent", "left", None)}),
         laterality=("Questionable small right pleural effusion.", {("pleural effusion", "uncertain", "right", "mild")}),
         severity=("Questionable large left pleural effusion.", {("pleural effusion", "uncertain", "left", "severe")})),
    dict(text="Likely right middle lobe atelectasis.",
         meaning={("atelectasis", "uncertain", "right", None)},
         negation=("No right middle lobe atelectasis.", {("atelectasis", "absent", "right", None)}),
         laterality=("Likely left middle lobe atelectasis.", {("atelectasis", "uncertain", "left", None)})),
    dict(text="Findings suggestive of mild pulmonary edema.",
         meaning={("pulmonary edema/hazy opacity", "uncertain", None, "mild")},
         negation=("Findings negative for mild pulmonary edema.", {("pulmonary edema/hazy opacity", "absent", None, None)}),
         severity=("Findings suggestive of severe pulmonary edema.",
                   {("pulmonary edema/hazy opacity", "uncertain", None, "severe")})),
    dict(text="Right upper lobe opacity concerning for pneumonia.",
         meaning={("lung opacity", "present", "right", None), ("pneumonia", "uncertain", "right", None)},
         negation=("No right upper lobe opacity concerning for pneumonia.",
                   {("lung opacity", "absent", "right", None), ("pneumonia", "absent", "right", None)}),
         laterality=("Left upper lobe opacity concerning for pneumonia.",
                     {("lung opacity", "present", "left", None), ("pneumonia", "uncertain", "left", None)})),
    dict(text="Mild cardiomegaly is unchanged.",
         meaning={(ECS, "present", None, "mild")},
         negation=("Mild cardiomegaly has resolved.", {(ECS, "absent", None, None)}),
         severity=("Severe cardiomegaly is unchanged.", {(ECS, "present", None, "severe")})),
    dict(text="Small left pleural effusion has improved.",
         meaning={("pleural effusion", "present", "left", "mild")},
         negation=("Small left pleural effusion has resolved.", {("pleural effusion", "absent", "left", None)}),
         laterality=("Small right pleural effusion has improved.", {("pleural effusion", "present", "right", "mild")}),
         severity=("Large left pleural effusion has improved.", {("pleural effusion", "present", "left", "severe")})),
    dict(text="Worsening right basilar consolidation.",
         meaning={("consolidation", "present", "right", None)},
         negation=("No right basilar consolidation.", {("consolidation", "absent", "right", None)}),
         laterality=("Worsening left basilar consolidation.", {("consolidation", "present", "left", None)})),
    dict(text="Stable moderate hiatal hernia.",
         meaning={("hernia", "present", None, "moderate")},
         negation=("No hiatal hernia.", {("hernia", "absent", None, None)}),
         severity=("Stable mild hiatal hernia.", {("hernia", "present", None, "mild")})),
    dict(text="Left lower lobe atelectasis is again seen.",
         meaning={("atelectasis", "present", "left", None)},
         negation=("Left lower lobe atelectasis is not seen.", {("atelectasis", "absent", "left", None)}),
         laterality=("Right lower lobe atelectasis is again seen.", {("atelectasis", "present", "right", None)})),
    dict(text="Heart size is normal.",
         meaning={(ECS, "absent", None, None)},
         negation=("Heart size is enlarged.", {(ECS, "present", None, None)})),
    dict(text="Heart size is at the upper limits of normal.",
         meaning={(ECS, "absent", None, None)},
         negation=("Heart size is enlarged.", {(ECS, "present", None, None)})),
    dict(text="The lungs are clear.",
         meaning={("lung opacity", "absent", None, None)},
         negation=("The lungs are opacified.", {("lung opacity", "present", None, None)})),
    dict(text="The left lung is clear.",
         meaning={("lung opacity", "absent", "left", None)},
         negation=("The left lung is opacified.", {("lung opacity", "present", "left", None)}),
         laterality=("The right lung is clear.", {("lung opacity", "absent", "right", None)})),
    dict(text="Heart size within normal limits, no typical findings of pulmonary edema.",
         meaning={(ECS, "absent", None, None), ("pulmonary edema/hazy opacity", "absent", None, None)},
         negation=("Heart size enlarged, typical findings of pulmonary edema.",
                   {(ECS, "present", None, None), ("pulmonary edema/hazy opacity", "present", None, None)})),
    dict(text="XXXX opacities in the left lung base, XXXX atelectasis.",
         meaning={("lung opacity", "present", "left", None), ("atelectasis", "uncertain", "left", None)},
         negation=("No opacities in the left lung base, XXXX atelectasis.",
                   {("lung opacity", "absent", "left", None), ("atelectasis", "absent", "left", None)}),
         laterality=("XXXX opacities in the right lung base, XXXX atelectasis.",
                     {("lung opacity", "present", "right", None), ("atelectasis", "uncertain", "right", None)})),
    dict(text="There is a small right pleural effusion.",
         meaning={("pleural effusion", "present", "right", "mild")},
         negation=("There is no right pleural effusion.", {("pleural effusion", "absent", "right", None)}),
         laterality=("There is a small left pleural effusion.", {("pleural effusion", "present", "left", "mild")}),
         severity=("There is a large right pleural effusion.", {("pleural effusion", "present", "right", "severe")})),
    dict(text="The aorta is tortuous.",
         meaning={("tortuous aorta", "present", None, None)},
         negation=("The aorta is not tortuous.", {("tortuous aorta", "absent", None, None)})),
    dict(text="Lungs are hyperinflated.",
         meaning={("hyperaeration", "present", None, None)},
         negation=("Lungs are not hyperinflated.", {("hyperaeration", "absent", None, None)})),
    dict(text="Bilateral pleural effusions.",
         meaning={("pleural effusion", "present", "bilateral", None)},
         negation=("No bilateral pleural effusions.", {("pleural effusion", "absent", "bilateral", None)})),
    dict(text="Moderate right pneumothorax, unchanged.",
         meaning={("pneumothorax", "present", "right", "moderate")},
         negation=("No right pneumothorax.", {("pneumothorax", "absent", "right", None)}),
         laterality=("Moderate left pneumothorax, unchanged.", {("pneumothorax", "present", "left", "moderate")}),
         severity=("Mild right pneumothorax, unchanged.", {("pneumothorax", "present", "right", "mild")})),
    dict(text="Small right pleural effusion is unchanged since ___.",
         meaning={("pleural effusion", "present", "right", "mild")},
         negation=("Small right pleural effusion has resolved since ___.", {("pleural effusion", "absent", "right", None)}),
         laterality=("Small left pleural effusion is unchanged since ___.", {("pleural effusion", "present", "left", "mild")}),
         severity=("Large right pleural effusion is unchanged since ___.",
                   {("pleural effusion", "present", "right", "severe")})),
]
KINDS = ("negation", "laterality", "severity")
PARAMS = [pytest.param(case, kind, id=f"{kind}:{case['text']}") for case in CASES for kind in KINDS]


def test_the_hand_labelled_cases_cover_real_report_language():
    texts = " ".join(case["text"] for case in CASES)
    assert len(CASES) >= 30
    for phrase in ("is not seen", "not identified", "was not detected", "is not present", "is absent", "has resolved",
                   "no longer seen", "free of", "clear of", "cannot be excluded", "may reflect", "Questionable",
                   "Likely", "suggestive of", "concerning for", "unchanged", "improved", "Worsening", "Stable",
                   "again seen", "XXXX", "___", "NO "):
        assert phrase in texts, phrase


@pytest.mark.parametrize("case, kind", PARAMS)
def test_perturbation_gives_the_hand_written_rewrite(case, kind):
    expected = case.get(kind)
    assert PERTURBERS[kind](case["text"]) == (expected[0] if expected else None)


@pytest.mark.parametrize("case, kind", [p for p in PARAMS if p.values[0].get(p.values[1])])
def test_hand_labels_say_the_rewrite_changes_the_meaning(case, kind):
    _, meaning = case[kind]
    assert meaning != case["meaning"]
    if kind == "negation":  # every finding the rewrite keeps has flipped between absent and stated
        before = {finding: status == "absent" for finding, status, _, _ in case["meaning"]}
        assert all(before[finding] != (status == "absent") for finding, status, _, _ in meaning)
    if kind == "laterality":
        assert {(f, s) for f, s, _, _ in meaning} == {(f, s) for f, s, _, _ in case["meaning"]}
    if kind == "severity":
        assert {(f, s, side) for f, s, side, _ in meaning} == {(f, s, side) for f, s, side, _ in case["meaning"]}


@pytest.mark.parametrize("case", CASES, ids=[case["text"] for case in CASES])
def test_perturb_phrase_returns_one_of_the_hand_written_rewrites(case):
    expected = {(case[kind][0], kind) for kind in KINDS if case.get(kind)}
    for seed in range(4):
        result = perturb_phrase(case["text"], np.random.default_rng(seed))
        assert (result.text, result.kind) in expected


def test_skipped_perturbations_are_counted_not_raised():
    before = Counter(perturb.SKIPPED)
    assert swap_laterality("No pneumothorax.") is None
    assert flip_negation("No acute cardiopulmonary process.") is None
    assert perturb_phrase("No acute cardiopulmonary process.", np.random.default_rng(0)) is None
    added = Counter(perturb.SKIPPED)
    added.subtract(before)
    assert added["laterality"] >= 1 and added["negation"] >= 2 and added["phrase"] == 1


# ------------------------------------------------------------------------------------------- never raises
FUZZ = [
    "", " ", ".", "...", "?!;:", "XXXX", "XXXX XXXX.", "___", "___ ___, ___.", "NO PLEURAL EFFUSION OR PNEUMOTHORAX",
    "THE LUNGS ARE CLEAR", "Pleural effusion is not seen", "pleural effusion is not seen and no", "no", "not",
    "İstanbul ﬁndings: ǅ ß ПНЕВМОТОРАКС 肺炎 — “no” pneumothorax…", "\x00\t\n\r", "Right/left/ /or/ versus vs.",
    "(" * 50, ")" * 50, "/" * 100, "1. 2. 3.", "FINDINGS: IMPRESSION: INDICATION:", "No " * 700,
    ("Small right pleural effusion, " * 80)[:2000], ("opacity or " * 200)[:2000], ("The lungs are clear " * 100)[:2000],
    "x" * 2000, "." * 2000, ("heart size normal, " * 110)[:2000],
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    words = ("no not without free of clear lungs are is the heart size normal within limits pleural effusion pneumothorax "
             "right left bilateral both base apex lobe opacity atelectasis or versus / and/or , ; ( . XXXX ___ has "
             "resolved seen absent longer likely may represent cannot be excluded stable unchanged mild small large "
             "calcified granuloma cardiomegaly enlarged tortuous aorta which with but consistent hyperinflated "
             "expanded vascularity spaces İ ß é 中").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(count)]


def _exercise(text: str, rng: np.random.Generator) -> None:
    parse_report(text)
    for perturber in PERTURBERS.values():
        rewrite = perturber(text)
        assert rewrite is None or (isinstance(rewrite, str) and rewrite)
    perturb_phrase(text, rng)


@pytest.mark.parametrize("text", FUZZ + [t.upper() for t in FUZZ[:10]], ids=range(len(FUZZ) + 10))
def test_fuzz_strings_never_raise(text):
    _exercise(text, np.random.default_rng(0))


def test_random_vocabulary_strings_never_raise():
    rng = np.random.default_rng(1)
    for text in _random_texts(500):
        _exercise(text, rng)


# -------------------------------------------------------------------------------- every real sentence
@pytest.fixture(scope="module")
def iu_xray_reports(real_reports) -> list[dict[str, str]]:
    """The real Open-i reports as {section label: text} (`conftest.real_reports`)."""
    from train.data.iu_xray import read_report

    return [read_report(path).sections for path in sorted(real_reports.glob("*.xml"))]


def test_every_real_sentence_parses_perturbs_and_makes_region_texts(iu_xray_reports, capsys):
    from modeling_anatomy_vlm import AnatomyVLMConfig

    config = AnatomyVLMConfig()
    findings, region_names = list(config.findings), list(config.region_names)
    assert len(iu_xray_reports) > 3900
    own = [json.loads(line)["text"] for line in (ROOT / "train/text/data/report_sentences.jsonl").open(encoding="utf-8")
           if line.strip()]
    texts = [" ".join(f"{label}: {text}" for label, text in report.items()) for report in iu_xray_reports] + own
    sentences = sorted({s for report in iu_xray_reports for text in report.values() for s in split_sentences(text)}
                       | {s for text in own for s in split_sentences(text)})
    assert len(sentences) > 8000
    before = Counter(perturb.SKIPPED)
    rng = np.random.default_rng(0)
    for sentence in sentences:
        _exercise(sentence, rng)
    phrases: dict = {}
    mentioned = 0
    for text in texts:
        mentions = parse_report(text)
        mentioned += bool(mentions)
        region_phrases = mentions_to_region_phrases(mentions)
        region_texts_for_image(region_phrases, rng, perturb_prob=1.0, findings=findings, region_names=region_names)
        for region, entries in region_phrases.items():
            phrases.setdefault(region, []).extend(entries)
    texts_cached = possible_region_texts(phrases, findings, region_names)
    skipped = Counter(perturb.SKIPPED)
    skipped.subtract(before)
    with capsys.disabled():
        print(f"\n{len(sentences)} unique sentences, {len(texts)} reports and project sentences ({mentioned} with findings), "
              f"{len(texts_cached)} possible region texts; skipped perturbations: {dict(skipped)}")
    assert mentioned > 0.9 * len(iu_xray_reports)
    assert all(count >= 0 for count in skipped.values())
