"""Turn pytest-benchmark JSON into a Markdown report: per group, each implementation's median time,
its speed-up over the eager and the compiled reference, peak extra memory and achieved bandwidth.

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


def markdown(groups: dict[str, list[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        by_impl = {row["impl"]: row for row in rows}
        eager = by_impl.get("reference", {}).get("median")
        compiled = by_impl.get("reference_compiled", {}).get("median")
        lines += [
            f"### {group}",
            "",
            "| impl | median ms (IQR) | vs reference | vs compiled reference | peak extra MB (grad buffer MB) | GB/s | roofline |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(rows, key=lambda r: r["median"]):
            speedup = lambda base: f"{base / row['median']:.2f}x" if base else "-"  # noqa: E731
            roofline = f"{row['roofline_fraction']:.0%}" if "roofline_fraction" in row else "-"
            lines.append(
                f"| {row['impl']} | {row['median'] * 1e3:.1f} ({row['iqr'] * 1e3:.1f}) | {speedup(eager)} | "
                f"{speedup(compiled)} | {row['peak_extra_MB']:.0f} ({row['grad_buffer_MB']:.0f}) | "
                f"{row['achieved_GBps']:.1f} | {roofline} |"
            )
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
