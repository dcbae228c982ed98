"""Turn pytest-benchmark JSON into a Markdown report: per group, each implementation's median time,
its speed-up over the eager and the compiled reference, peak extra memory (and its ratio to the
reference's), and achieved bandwidth or FLOP rate where the benchmark records them.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out REPORT.md]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_rows(paths: list[Path]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        data = json.loads(path.read_text())
        for bench in data["benchmarks"]:
            stats = bench["stats"]
            groups[bench["group"]].append(
                dict(bench["extra_info"], median=stats["median"], iqr=stats["iqr"], rounds=stats["rounds"])
            )
    return groups


# Optional per-benchmark figures, shown when a group has them: (extra_info key, column title, format).
OPTIONAL_COLUMNS = [
    ("grad_buffer_MB", "grad buffer MB", "{:.0f}"),
    ("achieved_GBps", "GB/s", "{:.1f}"),
    ("roofline_fraction", "of HBM roofline", "{:.0%}"),
    ("TFLOPs", "TFLOP/s", "{:.2f}"),
]


def markdown(groups: dict[str, list[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        reference = next((row for row in rows if row["impl"] == "reference"), None)
        compiled = next((row for row in rows if row["impl"] == "reference_compiled"), None)
        optional = [column for column in OPTIONAL_COLUMNS if any(column[0] in row for row in rows)]
        header = ["impl", "median ms (IQR)", "speed-up vs reference", "vs compiled reference", "peak extra MB",
                  "memory vs reference"] + [title for _, title, _ in optional]  # fmt: skip
        lines += [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in sorted(rows, key=lambda r: r["median"]):
            speedup = lambda base: f"{base['median'] / row['median']:.2f}x" if base else "-"  # noqa: E731
            memory = f"{row['peak_extra_MB'] / reference['peak_extra_MB']:.2f}x" if reference else "-"
            cells = [row["impl"], f"{row['median'] * 1e3:.1f} ({row['iqr'] * 1e3:.1f})", speedup(reference),
                     speedup(compiled), f"{row['peak_extra_MB']:.0f}", memory]  # fmt: skip
            cells += [fmt.format(row[key]) if key in row else "-" for key, _, fmt in optional]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    text = markdown(load_rows(args.results))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
