"""Label generation rule 4: a text is a negative of a region of an image only where it contradicts that region's labels.

The property test grades `collate_region_texts` with an oracle written here from the data set rows (`region_labels`,
the scene-graph attributes) and a text -> facts table built in the test, not with the production code path.
"""

import re

import numpy as np
import pytest

from modeling_anatomy_vlm.configuration_anatomy_vlm import AnatomyVLMConfig
from train.data.common import region_phrases_of
from train.text.parser import parse_report
from train.text.perturb import PERTURBERS
from train.text.region_texts import (
    ImageRegionTexts,
    RegionPrompts,
    collate_region_texts,
    normalize_text,
    region_texts_for_image,
)

CONFIG = AnatomyVLMConfig()
NAMES, FINDINGS = tuple(CONFIG.region_names), tuple(CONFIG.findings)
R = {name: i for i, name in enumerate(NAMES)}
LUNG_REGIONS = [i for i, name in enumerate(NAMES) if "lung" in name or "apical" in name]
CLEAR = ("The lungs are clear.", [("anatomicalfinding", False, "lung opacity"), ("nlp", True, "normal")])


def items_for(images, perturb_prob=0.0, seed=0):
    """region_texts_for_image of each {region: [(phrase, triples)]}, as the training collator calls it."""
    prompts = RegionPrompts.from_config(CONFIG)
    return [region_texts_for_image(phrases, np.random.default_rng([seed, i]), perturb_prob=perturb_prob,
                                   findings=FINDINGS, region_names=NAMES, prompts=prompts)
            for i, phrases in enumerate(images)]


def collate(images, perturb_prob=0.0, seed=0):
    texts, positive, negative = collate_region_texts(items_for(images, perturb_prob, seed))
    return {text: i for i, text in enumerate(texts)}, positive, negative


def finding(label, present=True, category="anatomicalfinding"):
    return (category, present, label)


# ----------------------------------------------------------------------------------------------- rule 4, by example


def test_a_sentence_shared_by_normal_regions_is_no_negative_of_them():
    """The issue's example: "The lungs are clear." at image 0's left lung and image 1's right lung, both normal."""
    t, positive, negative = collate([{"left lung": [CLEAR]}, {"right lung": [CLEAR]}])
    clear = t["The lungs are clear."]
    assert positive[0, R["left lung"], clear] and positive[1, R["right lung"], clear]
    assert not negative[1, R["right lung"], clear]
    assert not negative[:, LUNG_REGIONS, clear].any()  # nor of any other (normal) lung region of either image
    assert not negative[:, :, clear].any()  # it contradicts nothing in these two normal images


def test_a_sentence_is_a_negative_where_it_contradicts():
    opacity = ("Right lower lobe opacity.", [finding("lung opacity"), ("nlp", True, "abnormal")])
    t, positive, negative = collate([{"left lung": [CLEAR]}, {"right lung": [CLEAR]}, {"right lung": [opacity]}])
    clear = t["The lungs are clear."]
    assert negative[2, R["right lung"], clear]  # image 2's right lung has an opacity
    assert negative[:, :, clear].sum() == 1
    # the opacity sentence is a negative of a clear right lung, not of the right lung it describes
    assert negative[0, R["right lung"], t["Right lower lobe opacity."]]
    assert not negative[2, R["right lung"], t["Right lower lobe opacity."]]


def test_same_region_of_another_image_and_laterality():
    right = ("Small right pleural effusion.", [finding("pleural effusion")])
    left = ("Small left pleural effusion.", [finding("pleural effusion")])
    t, positive, negative = collate([{"right costophrenic angle": [right]}, {"left costophrenic angle": [left]}, {}])
    rcpa, lcpa = R["right costophrenic angle"], R["left costophrenic angle"]
    small_right, small_left = t["Small right pleural effusion."], t["Small left pleural effusion."]
    # a positive of the same region elsewhere is a negative where that region is normal ...
    assert negative[1, rcpa, small_right] and negative[2, rcpa, small_right]
    # ... a text naming the other side contradicts a lateral region even when the finding agrees ...
    assert negative[0, rcpa, small_left] and negative[1, lcpa, small_right]
    # ... and a negated prompt agrees with a normal region, so it is no negative there
    no_effusion = t["no pleural effusion in the right costophrenic angle"]
    assert negative[0, rcpa, no_effusion] and not negative[1:, rcpa, no_effusion].any()
    assert not (positive & negative).any()


def test_a_phrase_states_at_each_region_what_its_attributes_say_there():
    both = "Right pleural effusion and left basilar atelectasis."
    image0 = {"right costophrenic angle": [(both, [finding("pleural effusion")])],
              "left lower lung zone": [(both, [finding("atelectasis")])]}
    image1 = {"right costophrenic angle": [("Small right pleural effusion.", [finding("pleural effusion")])]}
    t, positive, negative = collate([image0, image1])
    # at image 1's right costophrenic angle it states an effusion, which is there: no negative
    assert not negative[1, R["right costophrenic angle"], t[both]]
    # image 1's left lower zone has no atelectasis: a negative there
    assert negative[1, R["left lower lung zone"], t[both]]
    # a region it is never attached to reads it whole (effusion and atelectasis): the normal spine contradicts it
    assert negative[1, R["spine"], t[both]]


def test_perturbations_stay_hard_negatives_of_their_region():
    phrases = {"right costophrenic angle": [("Small right pleural effusion.", [finding("pleural effusion")])],
               "right lung": [("No right pneumothorax.", [finding("pneumothorax", False)])]}
    kinds = set()
    for seed in range(12):
        (item,) = items_for([phrases], perturb_prob=1.0, seed=seed)
        texts, positive, negative = collate_region_texts([item])
        t = {text: i for i, text in enumerate(texts)}
        for region, entries in phrases.items():
            r = R[region]
            for perturbed in [x for x in item.negatives[r] if "the " + region not in x]:  # the prompts name the region
                kinds |= {kind for kind, perturb in PERTURBERS.items() if perturb(entries[0][0]) == perturbed}
                assert negative[0, r, t[perturbed]], (region, perturbed)
    assert kinds == {"negation", "laterality", "severity"}
    # a severity swap contradicts a region graded otherwise, and not one whose grade is unknown
    t, positive, negative = collate([{"right costophrenic angle": [(text, [finding("pleural effusion")])]} for text in
                                     ("Large right pleural effusion.", "Small right pleural effusion.",
                                      "Right pleural effusion.")])
    large, rcpa = t["Large right pleural effusion."], R["right costophrenic angle"]
    assert negative[1, rcpa, large] and not negative[2, rcpa, large]


def test_texts_without_facts_are_refused():
    (item,) = items_for([{"right lung": [CLEAR]}])
    facts = tuple({} if r == R["right lung"] else f for r, f in enumerate(item.facts))
    with pytest.raises(ValueError, match="region 'right lung' has texts without facts"):
        ImageRegionTexts(item.positives, item.negatives, item.region_names, facts, item.labels)


def test_collated_texts_are_deduplicated_and_every_region_has_a_positive_and_a_negative():
    image0 = {"right costophrenic angle": [("Small right pleural effusion.", [finding("pleural effusion")])]}
    image1 = {"right costophrenic angle": [("Small  right pleural effusion. ", [finding("pleural effusion")])]}
    texts, positive, negative = collate_region_texts(items_for([image0, image1, {}], perturb_prob=0.5))
    assert len(set(texts)) == len(texts) == positive.shape[2] and texts.count("Small right pleural effusion.") == 1
    assert positive.shape == negative.shape == (3, len(NAMES), len(texts))
    assert positive.any(axis=2).all() and negative.any(axis=2).all()
    assert not (positive & negative).any()


# ----------------------------------------------------------------------------------------------- rule 4, as a property
# The oracle: what each region of a row is (from the row), what each text of the batch states (from a table built
# here), and when a statement contradicts a region. Written independently of train.text.region_texts.

FINDING_CATEGORIES = {"anatomicalfinding", "disease", "technicalassessment", "tubesandlines", "device"}
GRADES = {"mild", "moderate", "severe"}


def oracle_side(text):
    words = set(re.findall(r"[a-z]+", text.lower()))
    sides = words & {"right", "left"}
    if words & {"bilateral", "bilaterally", "both", "bibasilar", "bibasal", "biapical"}:
        sides = {"right", "left"}
    return next(iter(sides)) if len(sides) == 1 else None


def region_side(name):
    side, _, rest = name.partition(" ")
    other = {"right": "left", "left": "right"}.get(side)
    return side if other and f"{other} {rest}" in NAMES else None


def graded(text):
    return {(m.finding, m.severity) for m in parse_report(text) if m.present and m.severity}


def only_unambiguous(pairs):
    counts = {}
    for label, _ in pairs:
        counts[label] = counts.get(label, 0) + 1
    return frozenset(p for p in pairs if counts[p[0]] == 1)


def statement(findings=(), grades=(), side=None, normal=False, abnormal=False):
    return {"findings": set(findings), "grades": set(grades), "side": side, "normal": normal, "abnormal": abnormal}


def merged(statements):
    findings = only_unambiguous(set().union(*(s["findings"] for s in statements)))
    grades = only_unambiguous(set().union(*(s["grades"] for s in statements)))
    sides = {s["side"] for s in statements}
    return (findings, grades, sides.pop() if len(sides) == 1 else None,
            any(s["normal"] for s in statements), any(s["abnormal"] for s in statements))


def region_truth(row, r):
    """(labels present, grades stated) of region r of a data set row: vocabulary findings from `region_labels`, the
    other finding labels from its scene-graph attributes."""
    name = NAMES[r]
    present = {FINDINGS[j] for j in np.flatnonzero(np.asarray(row["region_labels"])[r] == 1)}
    grades = set()
    for entry in row["region_phrases"]:
        if entry["region"] != name:
            continue
        grades |= graded(entry["phrase"])
        for attribute in entry["attributes"]:
            category, answer, label = attribute.split("|", 2)
            if category in FINDING_CATEGORIES and answer == "yes" and label not in FINDINGS:
                present.add(label)
    return frozenset(present), frozenset(grades)


def oracle_contradicts(claim, truth, side):
    findings, grades, claim_side, normal, abnormal = claim
    present, truth_grades = truth
    for label, is_present in findings:
        if is_present != (label in present):
            return True
    for label, grade in grades:
        stated = {g for l, g in truth_grades if l == label}
        if stated and grade not in stated:
            return True
    if (normal and present) or (abnormal and not present):
        return True
    return claim_side is not None and side is not None and claim_side != side


def text_table(prompts):
    """text -> (region, statement) of every prompt, normal description and template label generation can render."""
    table = {}
    for region in NAMES:
        side = region_side(region)
        table[f"the {region} is normal"] = (region, statement(side=side, normal=True))
        table[f"the {region} is abnormal"] = (region, statement(side=side, abnormal=True))
        for label in FINDINGS:
            table[prompts.render(label, region)] = (region, statement({(label, True)}, side=side))
            table[prompts.render(label, region, negated=True)] = (region, statement({(label, False)}, side=side))
            for grade in GRADES:
                table[f"{grade} {label} in the {region}"] = (region, statement({(label, True)}, {(label, grade)}, side))
    return table


def check_batch(rows, items, table):
    """Assert rule 4 on one collated batch against the oracle; returns the number of negatives."""
    texts, positive, negative = collate_region_texts(items)
    assert not (positive & negative).any()
    own = {}  # (image, text, region index) -> what that image's labels say the text states there
    for b, (row, item) in enumerate(zip(rows, items)):
        attributes = {}
        for entry in row["region_phrases"]:
            key = (normalize_text(entry["phrase"]), entry["region"])
            attributes.setdefault(key, set()).update(
                (label, answer == "yes") for category, answer, label in (a.split("|", 2) for a in entry["attributes"])
                if category in FINDING_CATEGORIES)
        for r, name in enumerate(NAMES):
            phrases = {p for p, region in attributes if region == name}
            for text in (*item.positives[r], *item.negatives[r]):
                if (text, name) in attributes:
                    said = statement(only_unambiguous(attributes[text, name]), only_unambiguous(graded(text)),
                                     oracle_side(text))
                elif text in table and table[text][0] == name:
                    said = table[text][1]
                elif any(perturb(p) is not None and normalize_text(perturb(p)) == text for p in phrases
                         for perturb in PERTURBERS.values()):
                    said = statement(only_unambiguous({(m.finding, m.present) for m in parse_report(text)}),
                                     only_unambiguous(graded(text)), oracle_side(text))
                else:
                    raise AssertionError(f"label generation made a text of unknown kind for {name!r}: {text!r}")
                own.setdefault((b, text, r), []).append(said)
    # what a text states at a region: every image's statements there; at a region where no image records it,
    # every statement of it anywhere (read as if it described that region)
    at_region, anywhere = {}, {}
    for (_, text, r), statements in own.items():
        at_region.setdefault((text, r), []).extend(statements)
        anywhere.setdefault(text, []).extend(statements)
    claims = {key: merged(statements) for key, statements in at_region.items()}
    anywhere = {text: merged(statements) for text, statements in anywhere.items()}
    truths = [[region_truth(row, r) for r in range(len(NAMES))] for row in rows]
    sides = [region_side(name) for name in NAMES]
    memo = {}

    def contradicts(claim, b, r):
        key = (claim, truths[b][r], sides[r])
        if key not in memo:
            memo[key] = oracle_contradicts(*key)
        return memo[key]

    for b in range(len(rows)):
        for r in range(len(NAMES)):
            for t, text in enumerate(texts):
                if positive[b, r, t]:  # agrees with what its own image says it states there
                    said = own[b, text, r]
                    assert not contradicts(merged(said), b, r), ("a positive contradicts its region", b, NAMES[r], text,
                                                                 said, truths[b][r])
                    continue
                claim = claims.get((text, r), anywhere[text])
                assert negative[b, r, t] == contradicts(claim, b, r), (
                    "negative" if negative[b, r, t] else "missed negative", b, NAMES[r], text, claim, truths[b][r])
    return negative.sum()


def test_negatives_are_exactly_the_contradicting_texts_on_random_phantom_batches(phantom_root, dataset_cache):
    from train.data.imagenome import load_imagenome

    dataset = load_imagenome(phantom_root, "train", region_names=NAMES, findings=FINDINGS)
    rows = list(dataset.select_columns(["image_id", "region_phrases", "region_labels"]))
    prompts = RegionPrompts.from_config(CONFIG)
    table = text_table(prompts)
    rng = np.random.default_rng(11)
    total = 0
    for batch in range(20):
        chosen = [rows[i] for i in rng.choice(len(rows), size=int(rng.integers(2, 13)), replace=False)]
        perturb_prob = float(rng.choice([0.0, 0.2, 1.0]))
        items = [region_texts_for_image(region_phrases_of(row["region_phrases"]), np.random.default_rng([batch, i]),
                                        perturb_prob=perturb_prob, findings=FINDINGS, region_names=NAMES,
                                        prompts=prompts)
                 for i, row in enumerate(chosen)]
        total += check_batch(chosen, items, table)
    assert total > 0
