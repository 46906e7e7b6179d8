"""Stage 2: amplify the target language's neurons (the paper's intervention)."""

from __future__ import annotations

from dataclasses import dataclass

from lsn_exp.errors import UserError

PATCHED_VALUES = ("pmax", "pmedian")


@dataclass(frozen=True)
class Factor:
    """``factor=`` parsed: multiply by ``value``, or set to the patched value ``kind``."""

    kind: str  # "mul" | "pmax" | "pmedian"
    value: float | None = None

    def __str__(self) -> str:
        return f"{self.value:g}" if self.kind == "mul" else self.kind


def parse_factor(raw) -> Factor:
    if isinstance(raw, bool):
        raw = str(raw)
    if isinstance(raw, (int, float)):
        return Factor("mul", float(raw))
    text = str(raw).strip().lower()
    if text in PATCHED_VALUES:
        return Factor(text)
    try:
        return Factor("mul", float(text))
    except ValueError:
        raise UserError(f"factor={raw!r} is not allowed: use a number (multiply, e.g. factor=5 or "
                        f"factor=0.5) or one of {', '.join(PATCHED_VALUES)} (set to the patched value)"
                        ) from None
