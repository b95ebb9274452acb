"""Byte budgets as users write them: `--cache-budget`, `--weight-budget`, `simulate --budget`
all accept the same forms and mean the same bytes. Standard library only (ships to boards)."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from moetvm.errors import UsageError

_UNITS = (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
FORMS = "bytes (1000000), a size (64MB, 3MiB) or a percentage (25%)"


class BudgetError(UsageError):
    """A budget that is not a positive, finite amount of bytes."""


def parse_budget(budget: int | float | str, total_bytes: int, what: str = "cache budget") -> int:
    """Bytes from an int, a float fraction of `total_bytes`, "25%" (of `total_bytes`), or a size
    such as "64MB" / "3MiB". Zero, negative, infinite and unreadable budgets are refused."""
    if isinstance(budget, bool):
        raise BudgetError(f"bad {what} {budget!r}: use {FORMS}")
    if isinstance(budget, int):
        value = float(budget)
    elif isinstance(budget, float):
        value = budget * total_bytes
    else:
        text = str(budget).strip().upper()
        scale, number = Fraction(1), text
        if text.endswith("%"):  # exact arithmetic: 100% is every byte, not one short of it
            scale, number = Fraction(total_bytes, 100), text[:-1]
        else:
            for suffix, unit in _UNITS:
                if text.endswith(suffix):
                    scale, number = Fraction(unit), text[: -len(suffix)]
                    break
        try:
            amount = Decimal(number.strip())
        except InvalidOperation:
            raise BudgetError(f"bad {what} {budget!r}: use {FORMS}") from None
        if not amount.is_finite():
            raise BudgetError(f"bad {what} {budget!r}: must be a positive, finite amount ({FORMS})")
        value = Fraction(amount) * scale
    if not math.isfinite(value) or value < 1:
        raise BudgetError(f"bad {what} {budget!r}: must be a positive, finite amount ({FORMS})")
    return int(value)
