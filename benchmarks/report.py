"""Turn pytest-benchmark JSON into a Markdown report with plots: per problem (a benchmark group), each
implementation's median time (with its IQR), its speed-up over the eager and the compiled reference, peak
extra memory and its ratio to the reference's, the roofline fraction where the benchmark records one, the
loss's agreement with the reference, and tsa_fast against each peer; per series of sizes (a `figure`), a
PNG of time and of peak memory against size, one line per implementation, log axes.

    python -m benchmarks.report RESULTS [RESULTS ...] [--out DIR_OR_MD] [--readme README.md]

RESULTS are pytest-benchmark JSON files, or results directories holding them (and an environment.txt;
other JSON files in a directory are ignored).
The Markdown goes to stdout; with --out also to that .md file (or DIR/report.md), the plots beside it.
With --readme every RESULTS must be a results directory: each one's report.md and plots are regenerated in
place, and README.md's section between the markers below is rewritten from them (a summary per
directory, its device and date, its plots), so that no figure in the README is typed by hand:

    python -m benchmarks.report benchmarks/results/2026-11-29-cpu-2core --readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

README_BEGIN, README_END = "<!-- performance:begin -->", "<!-- performance:end -->"
PEER_PREFIXES = ("sdpa", "kldivloss", "liger", "attention_forward")  # what users would otherwise pick


def impl_kind(impl: str) -> str:
    """`reference` (the pure-PyTorch reference, eager or compiled), `peer`, or `tsa_fast`."""
    if impl.startswith("reference"):
        return "reference"
    return "peer" if impl.startswith(PEER_PREFIXES) else "tsa_fast"


def load_rows(paths: list[Path]) -> dict[str, list[dict]]:
    """Benchmark rows by group: extra_info plus median, iqr, rounds (seconds), group, kind, figure."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        for bench in json.loads(path.read_text())["benchmarks"]:
            stats, info = bench["stats"], bench["extra_info"]
            groups[bench["group"]].append(
                dict(
                    info,
                    median=stats["median"],
                    iqr=stats["iqr"],
                    rounds=stats["rounds"],
                    group=bench["group"],
                    kind=info.get("kind", impl_kind(info["impl"])),
                    figure=info.get("figure", bench["group"]),
                )
            )
    return groups


def _num(x: float) -> str:
    """Three significant digits, without exponents for large values."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _ratio(x: float) -> str:
    """2 decimals; below 0.1, 2 significant digits (a memory ratio of 0.0005 is not 0.00)."""
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


# Optional per-benchmark figures, shown when a group has them: (extra_info key, column title, format).
OPTIONAL_COLUMNS = [
    ("grad_buffer_MB", "grad buffer MB", _num),
    ("achieved_GBps", "GB/s", _num),
    ("roofline_fraction", "of bandwidth roofline", "{:.0%}".format),
    ("TFLOPs", "TFLOP/s", _num),
    ("flops_fraction", "of matmul peak", "{:.0%}".format),
    ("loss_rel_err", "loss rel. err", "{:.0e}".format),
]


def _median_iqr(row: dict) -> str:
    """Median time in ms with its IQR in parentheses."""
    return f"{_num(row['median'] * 1e3)} ({_num(row['iqr'] * 1e3)})"


def _speedup(row: dict, base: dict | None) -> str:
    """How many times faster row is than base."""
    return _ratio(base["median"] / row["median"]) if base else "-"


def _find(rows: list[dict], impl: str) -> dict | None:
    return next((row for row in rows if row["impl"] == impl), None)


def group_table(rows: list[dict]) -> list[str]:
    """The table of one group: every implementation, fastest first."""
    reference, compiled = _find(rows, "reference"), _find(rows, "reference_compiled")
    optional = [column for column in OPTIONAL_COLUMNS if any(column[0] in row for row in rows)]
    header = [
        "impl",
        "kind",
        "median ms (IQR)",
        "speed-up vs reference",
        "vs compiled reference",
        "peak extra MB",
        "memory vs reference",
    ] + [title for _, title, _ in optional]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: r["median"]):
        memory = "-"
        if reference and "peak_extra_MB" in row and reference.get("peak_extra_MB", 0) > 0:
            memory = _ratio(row["peak_extra_MB"] / reference["peak_extra_MB"])
        cells = [
            row["impl"],
            row["kind"],
            _median_iqr(row),
            _speedup(row, reference),
            _speedup(row, compiled),
            _num(row["peak_extra_MB"]) if "peak_extra_MB" in row else "-",
            memory,
        ]
        cells += [fmt(row[key]) if key in row else "-" for key, _, fmt in optional]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def peer_table(rows: list[dict]) -> list[str]:
    """tsa_fast against each peer in one group: the peer's time over tsa_fast's (above 1: tsa_fast is faster)
    and tsa_fast's peak extra memory over the peer's (below 1: tsa_fast needs less)."""
    ours = sorted((row for row in rows if row["kind"] == "tsa_fast"), key=lambda r: r["median"])
    peers = sorted((row for row in rows if row["kind"] == "peer"), key=lambda r: r["median"])
    if not ours or not peers:
        return []
    lines = [
        "| tsa_fast | " + " | ".join(f"vs {peer['impl']}: speed-up, memory" for peer in peers) + " |",
        "|" + "---|" * (len(peers) + 1),
    ]
    for row in ours:
        cells = []
        for peer in peers:
            memory = "-"
            if peer.get("peak_extra_MB", 0) > 0 and "peak_extra_MB" in row:
                memory = _ratio(row["peak_extra_MB"] / peer["peak_extra_MB"])
            cells.append(f"{_ratio(peer['median'] / row['median'])}, {memory}")
        lines.append(f"| {row['impl']} | " + " | ".join(cells) + " |")
    return lines


def by_figure(groups: dict[str, list[dict]]) -> dict[str, list[tuple[str, list[dict]]]]:
    """Groups by figure (one series of sizes), each figure's groups in order of size."""
    figures: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for group, rows in groups.items():
        figures[rows[0]["figure"]].append((group, rows))
    for items in figures.values():
        items.sort(key=lambda item: item[1][0].get("size", 0))
    return figures


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_figure(figure: str, groups: list[tuple[str, list[dict]]], path: Path) -> None:
    """Time and peak extra memory against size, one line per implementation, log axes; a bar chart of
    both when the series has one size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, group_rows in groups for row in group_rows]
    order = {"tsa_fast": 0, "peer": 1, "reference": 2}
    impls = sorted({row["impl"] for row in rows}, key=lambda impl: (order[impl_kind(impl)], impl))
    sized = len({row.get("size") for row in rows}) > 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, scale, title in (
        (axes[0], "median", 1e3, "median time (ms)"),
        (axes[1], "peak_extra_MB", 1, "peak extra memory (MB)"),
    ):
        if sized:
            for impl in impls:
                points = sorted(
                    (row["size"], row[key] * scale) for row in rows if row["impl"] == impl and row.get(key, 0) > 0
                )
                if points:
                    style = "--" if impl_kind(impl) == "reference" else ":" if impl_kind(impl) == "peer" else "-"
                    ax.plot(*zip(*points), style, marker="o", label=impl)
            ax.set_xscale("log")
            sizes = sorted({row["size"] for row in rows})
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
            ax.set_xlabel(rows[0].get("x", "size"))
        else:
            values = [
                next((row[key] * scale for row in rows if row["impl"] == impl and key in row), 0) for impl in impls
            ]
            ax.bar(range(len(impls)), values, color=[f"C{i}" for i in range(len(impls))])
            ax.set_xticks(range(len(impls)), impls, rotation=30, ha="right")
        if sized and any(row.get(key, 0) > 0 for row in rows):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if sized:
        axes[0].legend(fontsize=8)
    fig.suptitle(figure, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def roofline_notes(rows: list[dict]) -> list[str]:
    notes = sorted({row["roofline"] for row in rows if "roofline" in row})
    return [f"Roofline ceilings: {note}." for note in notes]


def markdown(groups: dict[str, list[dict]], plot_dir: Path | None = None, heading: str = "##") -> str:
    """The report: per figure, each group's table (and tsa_fast against the peers), then the plot
    (written to plot_dir when given)."""
    lines = []
    for figure, items in by_figure(groups).items():
        lines += [f"{heading} {figure}", ""]
        for group, rows in items:
            lines += [f"{heading}# {group}", "", *group_table(rows), ""]
            peers = peer_table(rows)
            if peers:
                lines += ["tsa_fast against the peers (their time over tsa_fast's; tsa_fast's memory over theirs):", ""]
                lines += [*peers, ""]
        notes = roofline_notes([row for _, rows in items for row in rows])
        lines += [*notes, ""] if notes else []
        if plot_dir is not None:
            name = slug(figure) + ".png"
            plot_figure(figure, items, plot_dir / name)
            lines += [f"![{figure}]({name})", ""]
    lines += [LEGEND]
    return "\n".join(lines)


README_INTRO = (
    "Every figure below is generated from the results directories named, with the device and date of each run. "
    "Reproduce: `python -m pytest benchmarks --benchmark-json=results.json && python -m benchmarks.report "
    "results.json --out DIR` (CPU), `bash benchmarks/gpu.sh` (a GPU; on a machine without network, first "
    "`bash benchmarks/gpu_wheels.sh` elsewhere and bring `.whl/`), `python -m benchmarks.ci` (CI's smoke run). "
    "What each suite compares, and its targets, is in its docstring (`benchmarks/bench_<op>.py`)."
)
NO_GPU = (
    "No GPU results yet: `benchmarks/gpu.sh` is the prepared run for a GPU (its correctness tests and the "
    "full-size benchmarks, JSON + Markdown + plots under benchmarks/results/)."
)
LEGEND = (
    "Median over the timed rounds, IQR in parentheses. *peak extra MB*: on a GPU the CUDA allocator's peak "
    "during one step above what was allocated before it; on the CPU the growth of resident memory during one "
    "step in a fresh process (in this process for smoke runs), the new `.grad` included. "
    "*kind*: `tsa_fast` (this package), `reference` "
    "(its pure-PyTorch reference, eager or under torch.compile), `peer` (what users would otherwise pick). "
    "Rooflines: the least bytes the problem moves over the copy bandwidth, or its FLOPs over the "
    "matrix-product rate, both measured on the device in the same run."
)


def results_files(results: list[Path]) -> list[Path]:
    """The JSON files named, and in each directory named the pytest-benchmark ones (other JSON there, such as
    a one-off measurement's record, is left alone)."""
    files = []
    for path in results:
        files += (
            sorted(f for f in path.glob("*.json") if "benchmarks" in json.loads(f.read_text()))
            if path.is_dir()
            else [path]
        )
    return files


def run_title(files: list[Path], groups: dict[str, list[dict]]) -> str:
    """The devices measured and the date of the run (from the first JSON's machine_info and datetime)."""
    if not files:
        return "no results"
    data = json.loads(files[0].read_text())
    devices = sorted({row.get("device", "?") for rows in groups.values() for row in rows})
    cpu = data["machine_info"]["cpu"]
    devices = [
        f"CPU ({cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores)" if d == "cpu" else d for d in devices
    ]
    return f"{', '.join(devices)}, {data['datetime'][:10]}"


def summary_table(groups: dict[str, list[dict]]) -> list[str]:
    """One row per (problem, tsa_fast implementation): the figures a reader looks for first."""
    header = [
        "problem",
        "impl",
        "median ms (IQR)",
        "vs reference",
        "vs compiled reference",
        "vs fastest peer",
        "peak extra MB",
        "memory vs reference",
        "of roofline",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, rows in groups.items():
        reference, compiled = _find(rows, "reference"), _find(rows, "reference_compiled")
        peers = sorted((row for row in rows if row["kind"] == "peer"), key=lambda r: r["median"])
        for row in sorted((row for row in rows if row["kind"] == "tsa_fast"), key=lambda r: r["median"]):
            peer = f"{_speedup(row, peers[0])} ({peers[0]['impl']})" if peers else "-"
            memory = (
                _ratio(row["peak_extra_MB"] / reference["peak_extra_MB"])
                if reference and reference.get("peak_extra_MB")
                else "-"
            )
            fraction = row.get("roofline_fraction", row.get("flops_fraction"))
            cells = [
                group,
                row["impl"],
                _median_iqr(row),
                _speedup(row, reference),
                _speedup(row, compiled),
                peer,
                _num(row.get("peak_extra_MB", 0)),
                memory,
                "-" if fraction is None else f"{fraction:.0%}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(results: list[Path], out: Path) -> tuple[str, dict[str, list[dict]]]:
    """Write the Markdown to `out` (a .md file, or DIR/report.md) and the plots beside it."""
    report = out if out.suffix == ".md" else out / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    files = results_files(results)
    groups = load_rows(files)
    sources = ", ".join(str(path) for path in results)
    header = (
        f"# Benchmarks: {run_title(files, groups)}\n\nFrom {sources}; generated by `python -m benchmarks.report`.\n\n"
    )
    text = header + markdown(groups, report.parent)
    report.write_text(text + "\n")
    return text, groups


def readme_section(directories: list[Path], readme: Path) -> str:
    """The README's performance section: per results directory its device and date, environment, summary
    table, plots and a link to its full report (each regenerated in place)."""
    base = readme.resolve().parent

    def rel(path: Path) -> str:
        return os.path.relpath(path.resolve(), base)

    command = "python -m benchmarks.report " + " ".join(rel(d) for d in directories) + f" --readme {rel(readme)}"
    lines = [README_BEGIN, f"<!-- Generated by `{command}`; edit benchmarks/report.py, not this section. -->", ""]
    lines += [README_INTRO, ""]
    gpu = False
    for directory in directories:
        _, groups = write_report([directory], directory)
        title = run_title(results_files([directory]), groups)
        environment_file = directory / "environment.txt"
        environment = environment_file.read_text().strip().splitlines() if environment_file.exists() else []
        gpu |= any(row.get("device", "cpu") != "cpu" for rows in groups.values() for row in rows)
        lines += [
            f"### {title}",
            "",
            f"From `{rel(directory)}` (full tables: [report.md]({rel(directory / 'report.md')})).",
            "",
        ]
        lines += [f"- {line}" for line in environment] + ([""] if environment else [])
        lines += [*summary_table(groups), ""]
        for figure in by_figure(groups):
            lines += [f"![{figure}]({rel(directory / (slug(figure) + '.png'))})"]
        lines += [""]
    if not gpu:
        lines += [NO_GPU, ""]
    lines += [LEGEND, "", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} markers")
    readme.write_text(text[:begin] + section + text[end + len(README_END) :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON files or results directories")
    parser.add_argument(
        "--out", type=Path, help="write the Markdown here (a .md file, or DIR/report.md) and the plots beside it"
    )
    parser.add_argument(
        "--readme", type=Path, help="regenerate this README's performance section from results directories"
    )
    args = parser.parse_args(argv)
    if args.readme:
        not_dirs = [str(path) for path in args.results if not path.is_dir()]
        if not_dirs:
            parser.error(f"--readme takes results directories, not {not_dirs}")
        update_readme(args.readme, readme_section(args.results, args.readme))
        print(f"{args.readme}: performance section regenerated from {', '.join(map(str, args.results))}")
        return
    if args.out:
        text, _ = write_report(args.results, args.out)
    else:
        text = markdown(load_rows(results_files(args.results)))
    print(text)


if __name__ == "__main__":
    main()
