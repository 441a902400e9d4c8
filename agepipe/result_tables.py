"""Result tables: Markdown rendering, and the benchmarks' results (a Markdown table and its rows as JSON)."""

from __future__ import annotations

import json

from agepipe.config import PROJECT_ROOT

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"


def markdown_table(rows: list[dict], float_format: str = ".2f", formats: dict[str, str] | None = None) -> str:
    """A Markdown table of dicts that share their keys; floats by `float_format` or their column's
    entry in `formats`. The one table renderer of the benchmarks and the model card."""
    columns = list(rows[0])
    formats = formats or {}

    def cell(column: str, value: object) -> str:
        return format(value, formats.get(column, float_format)) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], notes: list[str]) -> str:
    """Print and save a Markdown table (`benchmarks/results/<name>.md`) and the raw rows (`.json`)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    table = markdown_table(rows) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (RESULTS_DIR / f"{name}.md").write_text(table)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    print(table)
    return table
