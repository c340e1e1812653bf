"""Label selectors (metav1.LabelSelector semantics): the one place that matches labels and writes a
selector the way kubectl does (`k=v,k2=v2`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def labels_match(match_labels: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Every wanted label is present with that value (an empty matchLabels matches everything)."""
    return all(labels.get(k) == v for k, v in (match_labels or {}).items())


def requirement_holds(key: str, operator: str, values: Iterable[str], labels: Mapping[str, str]) -> bool:
    """One matchExpressions entry: In, NotIn, Exists or DoesNotExist."""
    present = key in labels
    if operator == "In":
        return present and labels[key] in values
    if operator == "NotIn":
        return not (present and labels[key] in values)
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    raise ValueError(f"unknown label selector operator {operator!r}")


def selector_text(match_labels: Mapping[str, str] | None) -> str:
    """matchLabels as `kubectl get -l` takes them, sorted: `pool=fast,zone=a`."""
    return ",".join(f"{k}={v}" for k, v in sorted((match_labels or {}).items()))
