"""What the reports show of a stage on a live dataset: the set's growth on the loss plot,
and a line per stage in ``TRAINING_SUMMARY.md`` (from ``metrics.csv`` and ``summary.json``)."""

from __future__ import annotations

from typing import Any


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def growth_steps(rows: list[dict]) -> list[tuple[int, int]]:
    """``(step, samples)`` where the set had grown since the row before (``samples``)."""
    out, last = [], None
    for row in rows:
        step, size = _int(row.get("step")), _int(row.get("samples"))
        if step is None or size is None:
            continue
        if last is not None and size > last:
            out.append((step, size))
        last = size if last is None else max(last, size)
    return out


def mark_growth(ax, rows: list[dict]) -> None:
    """Dashed lines where the data grew, and the set's size on a second axis."""
    sizes = [(_int(r.get("step")), _int(r.get("samples"))) for r in rows]
    sizes = [(s, n) for s, n in sizes if s is not None and n is not None]
    if not sizes:
        return
    for i, (step, size) in enumerate(growth_steps(rows)):
        ax.axvline(step, color="tab:green", linestyle="--", linewidth=0.8, alpha=0.7,
                   label="data grew" if i == 0 else None)
    twin = ax.twinx()
    twin.step(*zip(*sizes), where="post", color="tab:gray", linewidth=0.9, alpha=0.6)
    twin.set_ylabel("samples in the set", color="tab:gray")


def summary_lines(summary: dict) -> list[str]:
    """``## Live data`` lines for each stage that trained on one."""
    lines = []
    for name, entry in (summary.get("stages") or {}).items():
        live = entry.get("live") if isinstance(entry, dict) else None
        if not isinstance(live, dict):
            continue
        grew = live.get("growth") or []
        lines.append(f"- `{name}`: `{live.get('dest')}`: started with "
                     f"{live.get('start_samples')} samples (min_samples "
                     f"{live.get('min_samples')}) after waiting {live.get('waited_s')} s; grew "
                     f"{len(grew)} time(s) while training, to {live.get('samples')} samples "
                     f"({live.get('records_trained')} records trained in "
                     f"{live.get('rounds')} round(s), each sample {live.get('visits')} time(s)"
                     f"); {'complete' if live.get('complete') else 'still open'}; records "
                     f"trained: `{live.get('consumed_file')}`.")
    return ["## Live data", "", *lines, ""] if lines else []


__all__ = ["growth_steps", "mark_growth", "summary_lines"]
