"""Byte counts for people: one function, three unit systems (each kept where its output
is shown or documented today)."""

from __future__ import annotations

UNITS = {
    "si": (1000, ("B", "KB", "MB", "GB")),            # deploy and collect output, README
    "binary": (1024, ("B", "KB", "MB", "GB")),        # checkpoint listings
    "iec": (1024, ("B", "KiB", "MiB", "GiB", "TiB")),  # quantization reports
}


def human_size(n: int | float | None, units: str = "si") -> str:
    """``1500 -> "1.5 KB"`` (si), ``"1.5 KB"`` at 1536 (binary), ``"1.5 KiB"`` at 1536
    (iec); whole bytes below the first step (``"999 B"``), one decimal above, the
    largest unit beyond; ``None`` is ``"n/a"``."""
    if n is None:
        return "n/a"
    step, names = UNITS[units]
    for unit in names[:-1]:
        if abs(n) < step:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= step
    return f"{n:.1f} {names[-1]}"


__all__ = ["UNITS", "human_size"]
