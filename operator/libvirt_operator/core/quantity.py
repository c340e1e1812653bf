"""Kubernetes resource quantities (the subset that makes sense for memory and disk sizes)."""

from __future__ import annotations

import re

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)
_FACTORS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def parse_quantity(value: str | int) -> int:
    """Bytes in a quantity such as ``512Mi`` or ``1G``; fractions round up to a whole byte."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r} (examples: 512Mi, 2Gi, 1G)")
    number = value.strip()[: len(value.strip()) - len(match.group(2) or "")]
    whole, _, frac = number.partition(".")
    factor = _FACTORS[match.group(2) or ""]
    total = int(whole) * factor
    if frac:
        total += -(-int(frac) * factor // 10 ** len(frac))
    return total


def format_bytes(value: int) -> str:
    """The largest binary unit that represents value exactly (``1536Mi``, ``2Gi``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        factor = _FACTORS[suffix]
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)
