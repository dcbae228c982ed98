"""CI's benchmark run: every suite at smoke size on the CPU, then the Markdown report on stdout.

    python -m benchmarks.ci [--out DIR]

Smoke sizes (TSA_FAST_BENCH=smoke) check that each suite runs and show every change's effect in the CI log;
they measure nothing worth keeping (2 minutes or so on 2 cores, most of it torch.compile). The JSON, the
pytest log, the report and its plots go to DIR (default: a new temporary directory); nothing is uploaded.
Exit status: non-zero only when a benchmark errors or fails (or the report cannot be made), whatever the
timings. Triton runs on the CPU only under its interpreter, which is no speed measurement: the suites skip
it (TRITON_INTERPRET is cleared here).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="where the JSON, log, report and plots go (default: a temporary directory)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="tsa_fast-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TSA_FAST_BENCH="smoke")
    for name in ("TRITON_INTERPRET", "TSA_FAST_BACKEND"):  # the suites pick and force backends themselves
        env.pop(name, None)
    root = Path(__file__).resolve().parent.parent
    start = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfE",
        f"--benchmark-json={out / 'smoke.json'}",
    ]
    with open(out / "pytest.log", "w") as log:
        status = subprocess.run(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    lines = (out / "pytest.log").read_text().splitlines()
    summary = next(
        (
            line
            for line in reversed(lines)
            if " in " in line and ("passed" in line or "failed" in line or "error" in line)
        ),
        "",
    )
    print(
        f"benchmarks (smoke, CPU): {summary or 'no summary'} [{time.monotonic() - start:.0f} s;"
        f" log, JSON, report and plots in {out}]"
    )
    if status != 0:
        print(f"pytest exit status {status}; the end of its log:\n" + "\n".join(lines[-60:]))
        return 1
    report = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", str(out / "smoke.json"), "--out", str(out)],
        cwd=root,
        env=env,
        check=False,
    )
    return 0 if report.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
