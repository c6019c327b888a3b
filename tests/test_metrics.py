"""train.eval.metrics: the local evaluate modules against scikit-learn and hand-computed values, threshold
selection and bootstrap intervals."""

import socket

import evaluate
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from train.eval.metrics import METRIC_NAMES, bootstrap_ci, load_metric, select_thresholds


@pytest.fixture(scope="module")
def metric():
    loaded = {name: load_metric(name, keep_in_memory=True) for name in METRIC_NAMES}
    return lambda name, **inputs: loaded[name].compute(**inputs)


def random_multilabel(seed, n=400, unknown=0.1):
    """Scores rounded to 0.05 (many ties) that depend on the labels; prevalences 5 % to 70 %; some -1."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 5)) < [0.05, 0.2, 0.5, 0.7, 0.3]).astype(int)
    scores = np.round(20 * (rng.random((n, 5)) + 0.4 * labels)) / 20
    labels[rng.random((n, 5)) < unknown] = -1
    return scores, labels


def shifted_boxes(ious):
    """Unit boxes and copies shifted right by d, so that IoU = (1 - d) / (1 + d) equals `ious`: [N, 1, 4] each."""
    shift = (1 - np.asarray(ious)) / (1 + np.asarray(ious))
    gt = np.tile([0.0, 0.0, 1.0, 1.0], (len(ious), 1, 1))
    pred = gt + np.stack([shift, 0 * shift, shift, 0 * shift], -1)[:, None]
    return pred, gt


# --- loading ----------------------------------------------------------------------------------------


def test_load_metric_reads_local_modules_without_network(monkeypatch):
    attempts = []  # evaluate swallows some network errors, so record attempts instead of only raising

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in METRIC_NAMES:
        assert isinstance(load_metric(name), evaluate.Metric)
    out = load_metric("bmac").compute(predictions=[[1], [0]], references=[[1], [0]])
    assert out["bmac"] == 1.0 and attempts == []
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("accuracy")


# --- BMAC -------------------------------------------------------------------------------------------


def test_bmac_matches_sklearn_balanced_accuracy_per_class(metric):
    scores, labels = random_multilabel(seed=0)
    thresholds = np.array([0.5, 0.6, 0.7, 0.4, 0.55])
    out = metric("bmac", predictions=scores, references=labels, thresholds=thresholds)
    expected = []
    for c in range(5):
        known = labels[:, c] >= 0
        expected.append(balanced_accuracy_score(labels[known, c], scores[known, c] >= thresholds[c]))
    assert list(out["bmac_per_class"].values()) == pytest.approx(expected)
    assert out["bmac"] == pytest.approx(np.mean(expected))
    # 0/1 decisions without thresholds give the same result.
    decisions = (scores >= thresholds).astype(int)
    assert metric("bmac", predictions=decisions, references=labels)["bmac"] == pytest.approx(out["bmac"])


def test_bmac_on_imbalanced_labels_differs_from_accuracy():
    # 95 negatives, 5 positives; predicted positive: 1 of the positives and 2 of the negatives.
    labels = np.r_[np.zeros(95, int), np.ones(5, int)]
    decisions = np.zeros(100, int)
    decisions[[0, 1, 95]] = 1
    bmac = load_metric("bmac").compute(predictions=decisions[:, None], references=labels[:, None])["bmac"]
    # TPR = 1/5, TNR = 93/95 -> BMAC = 0.5895; accuracy = (1 + 93) / 100 = 0.94.
    assert bmac == pytest.approx((1 / 5 + 93 / 95) / 2)
    assert np.mean(decisions == labels) == pytest.approx(0.94)
    # Predicting all negative is 95 % accurate and has BMAC 0.5.
    all_negative = load_metric("bmac").compute(predictions=np.zeros((100, 1)), references=labels[:, None])
    assert all_negative["bmac"] == 0.5


def test_bmac_masks_unknown_labels_and_checks_its_inputs(metric):
    labels = [[1], [0], [-1], [-1]]
    decisions = [[1], [0], [1], [0]]  # the last two would be one FP and one FN if -1 were read as a label
    assert metric("bmac", predictions=decisions, references=labels)["bmac"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        metric("bmac", predictions=[[0.3], [0.7]], references=[[0], [1]])
    with pytest.raises(ValueError, match="NaN threshold"):
        metric("bmac", predictions=[[0.3], [0.7]], references=[[0], [1]], thresholds=[np.nan])


# --- ROC AUC, AP, F1 --------------------------------------------------------------------------------


def test_auc_ap_f1_match_sklearn_on_known_labels(metric):
    scores, labels = random_multilabel(seed=1)
    thresholds = np.array([0.5, 0.6, 0.7, 0.4, 0.55])
    out = metric("multilabel_auc_ap", predictions=scores, references=labels, thresholds=thresholds)
    for c in range(5):
        known = labels[:, c] >= 0
        y, s = labels[known, c], scores[known, c]
        assert out["roc_auc_per_class"][c] == pytest.approx(roc_auc_score(y, s))
        assert out["average_precision_per_class"][c] == pytest.approx(average_precision_score(y, s))
        assert out["f1_per_class"][c] == pytest.approx(f1_score(y, s >= thresholds[c]))
    assert out["roc_auc"] == pytest.approx(np.mean(list(out["roc_auc_per_class"].values())))


def test_auc_ap_f1_hand_computed_with_unknown_rows_masked(metric):
    # Known rows, by score: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-). AUC: 3 of 4 pos/neg pairs ordered -> 0.75.
    # AP: precision 1 at recall 0.5, 2/3 at recall 1 -> 0.5 * 1 + 0.5 * 2/3. F1 at 0.5: TP 1, FN 1 -> 2/3.
    # The two unknown rows would change all three if they were read as labels.
    scores = [[0.1], [0.4], [0.35], [0.8], [0.9], [0.05]]
    labels = [[0], [0], [1], [1], [-1], [-1]]
    out = metric("multilabel_auc_ap", predictions=scores, references=labels, class_names=["effusion"])
    assert out["roc_auc_per_class"] == {"effusion": pytest.approx(0.75)}
    assert out["average_precision"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["bmac", "multilabel_auc_ap"])
def test_class_without_positives_or_negatives_is_nan_with_warning(metric, name):
    # Class 0 is defined; "no positives" has only negatives; "no negatives" has a positive, the rest unknown.
    labels = [[1, 0, 1], [0, 0, -1], [1, 0, -1], [0, 0, -1]]
    decisions = [[1, 1, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    names = ["edema", "no positives", "no negatives"]
    with pytest.warns(UserWarning, match="no positives.*no negatives"):
        out = metric(name, predictions=decisions, references=labels, class_names=names)
    key = "bmac" if name == "bmac" else "roc_auc"
    per_class = out[f"{key}_per_class"]
    assert np.isnan(per_class["no positives"]) and np.isnan(per_class["no negatives"])
    assert out[key] == per_class["edema"] == 0.75  # the macro skips the undefined classes
    with pytest.warns(UserWarning, match="no positives"):
        out = metric(name, predictions=[[1], [0]], references=[[0], [0]], class_names=["no positives"])
    assert np.isnan(out[key])


# --- boxes ------------------------------------------------------------------------------------------


def test_iou_of_hand_made_boxes_ignores_unannotated_regions(metric):
    gt = np.array([[[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 2, 1]], [[np.nan] * 4, [0, 0, 1, 1], [np.nan] * 4]])
    pred = np.array([[[0, 0, 2, 1], [2, 2, 3, 3], [1, 0, 3, 1]], [[5, 5, 6, 6], [0, 0, 1, 1], [5, 5, 6, 6]]])
    out = metric("box_iou", predictions=pred, references=gt, region_names=["same", "disjoint", "half"])
    # identical 1; disjoint 0 (image 0) and identical 1 (image 1); half-overlap: 1 / (2 + 2 - 1) = 1/3.
    assert out["iou_per_region"] == pytest.approx({"same": 1.0, "disjoint": 0.5, "half": 1 / 3})
    assert out["miou"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)


def test_ap_with_equal_scores_is_set_by_the_fraction_above_threshold(metric):
    # IoUs .92, .72, .52, .3: the fraction p with IoU >= t is 3/4 at t = .5, 1/2 for t in .55-.70,
    # 1/4 for t in .75-.90, 0 at .95. Equal scores give one operating point with precision = recall = p,
    # so the interpolated precision is p at the floor(100 p) + 1 recall points <= p: AP@t = p (100 p + 1) / 101.
    pred, gt = shifted_boxes([0.92, 0.72, 0.52, 0.3])
    out = metric("box_iou", predictions=pred, references=gt)
    assert out["acc50"] == pytest.approx(0.75)
    assert out["map_50"] == pytest.approx(0.75 * 76 / 101)
    assert out["map"] == pytest.approx((0.75 * 76 + 4 * 0.5 * 51 + 4 * 0.25 * 26) / 101 / 10)
    # Tied scores form one operating point, so the image order does not matter.
    reordered = metric("box_iou", predictions=pred[::-1], references=gt[::-1])
    assert reordered["map"] == pytest.approx(out["map"])


def test_ap_with_scores_matches_hand_computation(metric):
    # Ranked by score: IoUs .3, .92, .62, .1. For t in .50-.60 hits are [0, 1, 1, 0]: (recall, precision)
    # (0, 0), (.25, .5), (.5, 2/3), (.5, .5); the interpolated precision (best at any recall >= r) is 2/3
    # at all 51 recall points <= .5 and 0 above. For t in .65-.90 only the second hits: (.25, .5) is the
    # best point, so .5 at the 26 recall points <= .25. At .95 nothing hits.
    pred, gt = shifted_boxes([0.3, 0.92, 0.62, 0.1])
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    out = metric("box_iou", predictions=pred, references=gt, scores=scores)
    assert out["map_50"] == pytest.approx(51 * (2 / 3) / 101)
    assert out["map"] == pytest.approx((3 * 51 * (2 / 3) + 6 * 26 * 0.5) / 101 / 10)
    # Batches accumulated with add_batch give the same result (scores go to compute).
    box_metric = load_metric("box_iou", keep_in_memory=True)
    box_metric.add_batch(predictions=pred[:2], references=gt[:2])
    box_metric.add_batch(predictions=pred[2:], references=gt[2:])
    assert box_metric.compute(scores=scores)["map"] == pytest.approx(out["map"])


def test_region_never_annotated_is_nan_with_warning(metric):
    gt = np.array([[[0, 0, 1, 1], [np.nan] * 4]])
    pred = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    with pytest.warns(UserWarning, match="right apex"):
        out = metric("box_iou", predictions=pred, references=gt, region_names=["trachea", "right apex"])
    assert np.isnan(out["ap_per_region"]["right apex"]) and np.isnan(out["iou_per_region"]["right apex"])
    assert out["map"] == out["miou"] == 1.0


# --- threshold selection ----------------------------------------------------------------------------


def test_select_thresholds_maximises_balanced_accuracy_on_hand_example():
    # Balanced accuracy (TPR + TNR) / 2 per cut: .8 -> .625, .7 -> .75, .6 -> .875, .5 -> .75, .4 -> .625,
    # .3 -> .75, .2 -> .625, .1 -> .5; the unknown row (score .65) would otherwise be a false positive at .6.
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.65])[:, None]
    labels = np.array([0, 0, 1, 0, 0, 1, 1, 1, -1])[:, None]
    assert select_thresholds(scores, labels) == pytest.approx([0.6])


def test_select_thresholds_reaches_the_best_balanced_accuracy_of_any_cut():
    scores, labels = random_multilabel(seed=2)
    thresholds = select_thresholds(scores, labels)
    for c in range(5):
        known = labels[:, c] >= 0
        y, s = labels[known, c], scores[known, c]
        best = max(balanced_accuracy_score(y, s >= t) for t in np.unique(s))
        assert balanced_accuracy_score(y, s >= thresholds[c]) == pytest.approx(best)
    # Only the rows passed in count, in any order: a test split with a different optimum does not matter.
    test_scores, test_labels = random_multilabel(seed=3)
    test_scores = test_scores**3
    assert not np.allclose(select_thresholds(np.r_[scores, test_scores], np.r_[labels, test_labels]), thresholds)
    rows = np.random.default_rng(0).permutation(len(scores))
    np.testing.assert_array_equal(select_thresholds(scores[rows], labels[rows]), thresholds)


def test_select_thresholds_undefined_class_is_nan_with_warning():
    scores = np.array([[0.2, 0.9], [0.8, 0.1], [0.5, 0.4]])
    labels = np.array([[0, 0], [1, 0], [-1, -1]])
    with pytest.warns(UserWarning, match=r"\[1\]"):
        thresholds = select_thresholds(scores, labels)
    assert thresholds[0] == 0.8 and np.isnan(thresholds[1])


# --- bootstrap --------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    scores, labels = random_multilabel(seed=4)
    auc = load_metric("multilabel_auc_ap")

    def macro_auc(s, y):
        return auc._compute(s, y)["roc_auc"]

    low, high = bootstrap_ci(macro_auc, scores, labels, n_resamples=200, seed=7)
    assert low < macro_auc(scores, labels) < high
    assert bootstrap_ci(macro_auc, scores, labels, n_resamples=200, seed=7) == (low, high)
    assert bootstrap_ci(macro_auc, scores, labels, n_resamples=200, seed=8) != (low, high)
    # An array-valued metric gives one interval per entry.
    per_class = lambda s, y: list(auc._compute(s, y)["roc_auc_per_class"].values())  # noqa: E731
    lows, highs = bootstrap_ci(per_class, scores, labels, n_resamples=200)
    assert lows.shape == (5,) and np.all(lows < per_class(scores, labels)) and np.all(per_class(scores, labels) < highs)


def test_bootstrap_ci_skips_resamples_where_the_metric_is_undefined():
    # 2 positives in 30 rows: about (28/30)^30 = 13 % of resamples hold no positive, where AUC is NaN.
    labels = np.zeros(30, int)
    labels[[3, 17]] = 1
    scores = np.linspace(0, 1, 30)

    def auc(s, y):
        return roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan

    with pytest.warns(UserWarning, match="undefined and skipped"):
        low, high = bootstrap_ci(auc, scores, labels, n_resamples=300)
    assert 0 <= low <= auc(scores, labels) <= high <= 1
