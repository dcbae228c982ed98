"""The results of a recipe: a table printed on the console and written as results.md, and results.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=None if Console().is_terminal else 160)  # logs keep the table's full width


def write_table(title: str, columns: list[tuple[str, str, str]], results: dict[str, dict], out_dir: Path) -> None:
    """Print `results` (model name -> metrics) as a table of `columns` (result key, column title, format; "-"
    where a model has no such key) and write it to out_dir/results.md, and the results to results.json."""
    cells = {
        name: [fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns] for name, row in results.items()
    }
    table = Table(title=title)
    table.add_column("model")
    for _, column_title, _ in columns:
        table.add_column(column_title, justify="right")
    for name, row in cells.items():
        table.add_row(name, *row)
    console.print(table)

    header = ["model"] + [column_title for _, column_title, _ in columns]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join([name, *row]) + " |" for name, row in cells.items()]
    (out_dir / "results.md").write_text("\n".join(markdown) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
