"""Zero-shot that is zero-shot: the held-out prompt wording occurs in no training text, and a finding withheld from
training (`data.unseen_findings`) is named by none, while its labels still decide the other texts."""

import re

import numpy as np

from train.config import DEFAULT_CONFIG, load_config
from train.data.common import region_phrases_of
from train.data.imagenome import load_imagenome
from train.eval.zero_shot import HELDOUT_WORDING
from train.tasks.anatomy_vlm import training_texts
from train.text.region_texts import region_texts_for_image

# The test's own readings of "names an enteric tube" and "names a calcified nodule" (the parser's synonym tables are
# what the code uses).
ENTERIC = re.compile(r"\b(enteric|nasogastric|orogastric|feeding|ng|og|dobhoff)\b[\w\s-]*\btubes?\b", re.IGNORECASE)
CALCIFIED = re.compile(r"(?<!non-)(?<!non)\bcalcifi(?:ed|c)\s+(?:[\w-]+\s+){0,2}?(?:nodul\w*|granulomas?\b|densit\w*)"
                       r"|\bgranulom(?:a|as|ata)\b", re.IGNORECASE)
CARDIOVASCULAR = re.compile(r"mitral|annul|aort|valv|atheroscl|arter|vascular", re.IGNORECASE)


def quickstart_texts(phantom_root, unseen=True):
    config = load_config(DEFAULT_CONFIG, [f"data.root={phantom_root}"] + ([] if unseen else ["data.unseen_findings=[]"]))
    model_config = config.model_config()
    splits = [load_imagenome(phantom_root, split, region_names=model_config.region_names,
                             findings=model_config.findings) for split in ("train", "validate")]
    texts = set().union(*(training_texts(split, model_config, config.data.unseen_findings) for split in splits))
    return config, model_config, splits, texts


def test_heldout_wording_occurs_in_no_training_text(phantom_root, dataset_cache):
    config, model_config, _, texts = quickstart_texts(phantom_root)
    corpus = "\n".join(text.lower() for text in texts)
    findings = list(model_config.findings) + list(config.data.unseen_findings)
    prompts = [t.format(finding=f) for t in HELDOUT_WORDING["global"] for f in findings]
    prompts += [t.format(finding=f, region=r) for key in ("region", "region_negated") for t in HELDOUT_WORDING[key]
                for r in model_config.region_names for f in findings]
    assert len(texts) > 1000 and len(prompts) == 2 * len(findings) * (1 + 2 * len(model_config.region_names))
    inside = [p for p in prompts if p.lower() in corpus]
    assert not inside, inside[:5]
    # the trained wording is there, so the check can fail
    assert f"{model_config.findings[0]} in the {model_config.region_names[0]}" in corpus


def test_an_unseen_finding_leaves_every_training_text_but_its_labels_still_count(phantom_root, dataset_cache):
    config, model_config, splits, texts = quickstart_texts(phantom_root)
    assert config.data.unseen_findings == ["calcified nodule"] and "calcified nodule" not in model_config.findings
    assert not [t for t in texts if CALCIFIED.search(t) or "calcified" in t.lower()]
    _, _, _, all_texts = quickstart_texts(phantom_root, unseen=False)
    assert [t for t in all_texts if CALCIFIED.search(t)]  # the phantom reports do name it
    # an image with a calcified nodule: its lung zone is not "normal" though no text about the nodule is left
    rows = [row for split in splits for row in split.select_columns(["region_phrases"])["region_phrases"]]
    item_of = next(item for row in rows for item in row
                   if CALCIFIED.search(item["phrase"]) and item["region"].endswith("lung zone"))
    region = item_of["region"]
    only_nodule = region_phrases_of([item_of])
    item = region_texts_for_image(only_nodule, np.random.default_rng(0), findings=model_config.findings,
                                  region_names=model_config.region_names,
                                  unseen_findings=frozenset(["calcified nodule"]))
    index = list(model_config.region_names).index(region)
    normal = f"the {region} is normal"
    assert normal in item.negatives[index] and normal not in item.positives[index]
    assert not [t for t in (*item.positives[index], *item.negatives[index]) if CALCIFIED.search(t)]


def test_real_report_sentences_about_tubes_are_withheld(real_reports):
    """On the real Open-i reports: every sentence naming an enteric / NG / feeding tube is kept out of training when
    "enteric tube" is unseen, and sentences about other tubes and lines are not."""
    from tests.test_real_sentences_training import real_sentences
    from train.text.region_texts import names_unseen_finding

    sentences = real_sentences(real_reports, max_reports=4000)
    unseen = frozenset(["enteric tube"])
    about_tube = [s for s in sentences if ENTERIC.search(s)]
    assert len(about_tube) >= 5
    assert all(names_unseen_finding(s, (), unseen) for s in about_tube), [
        s for s in about_tube if not names_unseen_finding(s, (), unseen)]
    other_tubes = [s for s in sentences if re.search(r"endotracheal|picc|chest tube|catheter", s, re.I)
                   and not ENTERIC.search(s)]
    assert other_tubes and not [s for s in other_tubes if names_unseen_finding(s, (), unseen)]


def test_real_report_sentences_about_calcified_nodules_are_withheld(real_reports):
    """On the real Open-i reports: every sentence naming a calcified nodule or a granuloma is kept out of training
    when "calcified nodule" (the quickstart's unseen finding) is, and sentences about other nodules are not."""
    from tests.test_real_sentences_training import real_sentences
    from train.text.region_texts import names_unseen_finding

    sentences = real_sentences(real_reports, max_reports=4000)
    unseen = frozenset(["calcified nodule"])
    about_it = [s for s in sentences if CALCIFIED.search(s) and not CARDIOVASCULAR.search(s)]
    assert len(about_it) >= 20
    assert all(names_unseen_finding(s, (), unseen) for s in about_it), [
        s for s in about_it if not names_unseen_finding(s, (), unseen)]
    other_nodules = [s for s in sentences
                     if re.search(r"\bnodul|\bmass\b", s, re.I) and not re.search(r"calcif|granulom", s, re.I)]
    assert len(other_nodules) >= 5 and not [s for s in other_nodules if names_unseen_finding(s, (), unseen)]
    # a calcific density the sentence puts on a heart valve is not a calcified nodule
    valve = [s for s in sentences if CALCIFIED.search(s) and CARDIOVASCULAR.search(s)]
    assert any("mitral" in s.lower() for s in valve) and not [s for s in valve if names_unseen_finding(s, (), unseen)]
