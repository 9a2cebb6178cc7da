"""Terminal tables both faces print (the ``remoteops`` program and ``remoteops-agent``):
rich for people, ``--json`` for machines. Laptop-only tables are ``remoteops.laptop.render``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # rich is imported where a table is drawn: JSON output does not load it
    from rich.console import Console
    from rich.table import Table


def console() -> "Console":
    from rich.console import Console

    return Console(soft_wrap=False)


def name_column(table: Table, header: str, **kwargs: Any) -> None:
    """A column of names a user types back (a backup, a run id): never cut or folded."""
    table.add_column(header, no_wrap=True, overflow="fold", **kwargs)


def print_wide(table: Table) -> None:
    """Print a table so that no word is cut: on a narrow terminal or a pipe (80 columns, or
    $COLUMNS) the lines get longer instead, since a name with an ellipsis cannot be typed."""
    out = console()
    roomy = out.options.update_width(10_000)
    if out.measure(table, options=roomy).maximum > out.width:
        # rich squeezes wrapping columns below their longest word, so cap each at that word
        # and size the output to the result, instead of letting rich squeeze
        try:
            for column in table.columns:
                if not column.no_wrap:
                    column.max_width = max(1, table._measure_column(out, roomy, column).minimum
                                           - table._get_padding_width(column._index))
        except AttributeError:  # another rich: its own layout, names still no_wrap
            pass
        need = out.measure(table, options=roomy).maximum
        from rich.console import Console

        out = Console(soft_wrap=False, width=max(need, out.width))
    out.print(table)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_plugins(infos: Iterable[Any], as_json: bool) -> None:
    rows = [i.to_dict() for i in infos]
    if as_json:
        print_json(rows)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="remoteops plugins", title_justify="left")
    name_column(table, "name")
    for col in ("version", "source", "hooks", "location"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(x) for x in (r["name"], r["version"], r["source"],
                                             ", ".join(r["hooks"]), r["location"])))
    print_wide(table)
