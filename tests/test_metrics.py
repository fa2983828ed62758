import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.metrics import Metrics, confusion_matrix, metrics_from_confusion

# Six pixels, three classes, worked by hand:
#   reference  0 0 1 1 2 2
#   prediction 0 1 1 1 2 0
REF = np.array([0, 0, 1, 1, 2, 2])
PRED = np.array([0, 1, 1, 1, 2, 0])
CM = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def hand_metrics() -> Metrics:
    return metrics_from_confusion(confusion_matrix(REF, PRED, 3), (1, 2, 3), ("water", "forest", "urban"))


def test_confusion_matrix_rows_are_reference() -> None:
    np.testing.assert_array_equal(confusion_matrix(REF, PRED, 3), CM)


def test_hand_computed_figures() -> None:
    m = hand_metrics()
    # IoU = TP / (TP + FP + FN): 1/(1+1+1), 2/(2+1+0), 1/(1+0+1)
    np.testing.assert_allclose(m.iou, [1 / 3, 2 / 3, 1 / 2])
    np.testing.assert_allclose(m.precision, [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(m.recall, [1 / 2, 1, 1 / 2])
    np.testing.assert_allclose(m.f1, [2 / 4, 4 / 5, 2 / 3])
    assert m.miou == pytest.approx(0.5)
    assert m.overall_accuracy == pytest.approx(4 / 6)
    # p_o = 4/6, p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3, kappa = (2/3 - 1/3) / (1 - 1/3)
    assert m.kappa == pytest.approx(0.5)
    assert m.pixels == 6


def test_valid_mask_excludes_pixels() -> None:
    valid = np.array([True, True, True, True, False, False])
    cm = confusion_matrix(REF, PRED, 3, valid)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm, (1, 2, 3))
    # class 3 is in neither raster: NaN, and left out of the means
    assert math.isnan(m.iou[2]) and math.isnan(m.f1[2])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_predicted_but_absent_counts_as_zero() -> None:
    m = metrics_from_confusion(np.array([[3, 1], [0, 0]]), (1, 2))
    assert m.iou[1] == 0.0
    assert math.isnan(m.recall[1])
    assert m.miou == pytest.approx((3 / 4 + 0) / 2)


def test_perfect_and_degenerate_kappa() -> None:
    assert metrics_from_confusion(np.diag([5, 7, 2]), (1, 2, 3)).kappa == pytest.approx(1.0)
    assert math.isnan(metrics_from_confusion(np.array([[4, 0], [0, 0]]), (1, 2)).kappa)
    empty = metrics_from_confusion(np.zeros((2, 2), int), (1, 2))
    assert math.isnan(empty.overall_accuracy) and math.isnan(empty.kappa) and math.isnan(empty.miou)


def test_out_of_range_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 3)
    # out-of-range values are fine where they are not counted
    cm = confusion_matrix(np.array([0, 9]), np.array([0, 9]), 2, np.array([True, False]))
    assert cm.sum() == 1


def test_json_and_table() -> None:
    m = metrics_from_confusion(
        np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]]), (1, 2, 3), ("water", "forest", "urban")
    )
    data = json.loads(m.to_json(region="rows 0:10"))
    assert data["region"] == "rows 0:10"
    assert data["pixels"] == 4
    assert data["overall_accuracy"] == pytest.approx(0.75)
    assert data["classes"][2]["iou"] is None  # NaN -> null
    assert data["confusion_matrix"]["counts"] == [[3, 1, 0], [0, 0, 0], [0, 0, 0]]
    table = m.format_table()
    assert "water" in table and "Cohen's kappa" in table and "0.750" in table


def test_metrics_add() -> None:
    a = hand_metrics()
    total = a + a
    np.testing.assert_array_equal(total.confusion, 2 * CM)
    assert total.miou == pytest.approx(a.miou)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=60),
        )
    )
)
def test_matches_brute_force(case: tuple[int, list[tuple[int, int]]]) -> None:
    k, pairs = case
    ref = np.array([r for r, _ in pairs])
    pred = np.array([p for _, p in pairs])
    m = metrics_from_confusion(confusion_matrix(ref, pred, k), tuple(range(1, k + 1)))
    assert m.pixels == len(pairs)
    assert m.overall_accuracy == pytest.approx(np.mean(ref == pred))
    for c in range(k):
        inter = np.sum((ref == c) & (pred == c))
        union = np.sum((ref == c) | (pred == c))
        if union:
            assert m.iou[c] == pytest.approx(inter / union)
        else:
            assert math.isnan(m.iou[c])
    assert -1.0 <= m.kappa <= 1.0 or math.isnan(m.kappa)
