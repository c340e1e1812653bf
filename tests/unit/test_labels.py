"""Label selectors as Kubernetes defines them, from the one helper (core/labels.py)."""

from __future__ import annotations

import pytest

from libvirt_operator.core.api.host import LabelSelector
from libvirt_operator.core.labels import labels_match, requirement_holds, selector_text

LABELS = {"zone": "a", "tier": "gold"}


def test_match_labels_all_present_with_the_value() -> None:
    assert labels_match({"zone": "a"}, LABELS)
    assert not labels_match({"zone": "a", "tier": "silver"}, LABELS)
    assert not labels_match({"rack": ""}, LABELS)  # absent is not the empty value
    assert labels_match({}, {}) and labels_match(None, LABELS)


@pytest.mark.parametrize(("operator", "values", "holds"), [
    ("In", ["a", "b"], True), ("In", ["b"], False), ("NotIn", ["b"], True), ("NotIn", ["a"], False),
    ("Exists", [], True), ("DoesNotExist", [], False)])
def test_expressions(operator: str, values: list[str], holds: bool) -> None:
    assert requirement_holds("zone", operator, values, LABELS) is holds
    # on a key the object lacks, only NotIn and DoesNotExist hold
    assert requirement_holds("rack", operator, values, LABELS) is (operator in ("NotIn", "DoesNotExist"))


def test_selector_ands_labels_and_expressions_and_prints_like_kubectl() -> None:
    sel = LabelSelector.model_validate({"matchLabels": {"zone": "a"},
                                        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]})
    assert not sel.matches(LABELS) and sel.matches({"zone": "a", "tier": "silver"})
    assert selector_text({"zone": "a", "tier": "gold"}) == "tier=gold,zone=a"
    with pytest.raises(ValueError, match="unknown label selector operator"):
        requirement_holds("zone", "Gt", [], LABELS)
