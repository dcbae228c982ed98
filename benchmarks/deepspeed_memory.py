"""Teacher memory under DeepSpeed: the same recipe in 1 process without DeepSpeed, in 2 processes with a ZeRO-3
teacher, and in 2 with the ZeRO-3 teacher's partitions offloaded to CPU memory (the README's "Large teachers").

    python -m benchmarks.deepspeed_memory --out benchmarks/results/deepspeed-cpu-2core     # ~10 min on 2 cores
    python -m benchmarks.deepspeed_memory --teacher "{d_model: 2048, n_layers: 24, n_heads: 16}" --out DIR  # GPUs

The teacher is a checkpoint of random weights of the `--teacher` shape (memory and speed do not depend on the
values). The data is a small text corpus (Python's pydoc topics) with small validation and test splits, so that
evaluating the teacher stays short; each run distills a small student for `--steps` steps, one thread per process,
in a temporary directory.
Measured per process (rank): the teacher parameter bytes it holds, its peak memory (CUDA: allocated; CPU: the peak
resident set of the whole process, torch and DeepSpeed included, and on rank 0 the pages of the memory-mapped
teacher checkpoint it reads; glibc is told to return freed blocks of 64 KiB and more to the system at once,
MALLOC_MMAP_THRESHOLD_, so that this peak follows the live tensors), and its distillation tokens/s. Writes
OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from tsa_fast.distill.data import build_data
from tsa_fast.models import Transformer
from tsa_fast.recipes.lm import load_config, model_config

ROOT = Path(__file__).resolve().parent.parent
RUNS = [  # (directory, name, DeepSpeed config: None for plain `python train.py`)
    ("plain", "1 process, no DeepSpeed", None),
    ("zero3", "2 processes, ZeRO-3 teacher", "zero3_teacher.json"),
    ("zero3_offload", "2 processes, ZeRO-3 teacher + CPU offload", "zero3_teacher_offload.json"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where results.json and results.md go")
    parser.add_argument(
        "--teacher", default="{d_model: 1024, n_layers: 16, n_heads: 16}", help="the teacher's shape (YAML)"
    )
    parser.add_argument("--steps", type=int, default=4, help="distillation steps per run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tsa_fast-deepspeed-") as work:
        results = benchmark(args.teacher, args.steps, Path(work))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def benchmark(teacher: str, steps: int, out: Path) -> dict:
    """The three runs of RUNS in `out`: their figures per process."""
    from pydoc_data.topics import topics

    corpus = out / "corpus.txt"
    corpus.write_text("\n\n".join(topics[name] for name in sorted(topics))[:150_000])
    recipe = [
        f"data.source={corpus}",
        "data.vocab_size=4096",
        "data.seq_len=128",
        "data.splits=[0.96, 0.02, 0.02]",
        f"data.cache_dir={out / 'cache'}",
        f"teachers.0.model={teacher}",
        f"teachers.0.checkpoint={out / 'teacher.pt'}",
        "student.model={d_model: 256, n_layers: 2, n_heads: 4}",
        f"training.steps={steps}",
        "training.batch_size=4",
        "training.warmup_steps=1",
        "baseline=false",
        "threads=1",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    teacher_bytes = write_random_teacher(recipe, out / "teacher.pt")

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "teacher": yaml.safe_load(teacher),
        "steps": steps,
        "runs": {},
    }
    for directory, name, ds_config in RUNS:
        print(f"{name} ...", flush=True)
        results["runs"][name] = measure(
            [*recipe, f"output_dir={out / directory}"], ds_config, out / directory, teacher_bytes
        )
    return results


def write_random_teacher(recipe: list[str], path: Path) -> int:
    """Write a teacher checkpoint ({"config", "model"}) of the recipe's teacher shape and data, random weights;
    returns the bytes of its parameters."""
    config = load_config(None, recipe)
    torch.manual_seed(0)
    teacher = Transformer(model_config(config.teachers[0].model, build_data(config.data), config.data.seq_len))
    torch.save({"config": teacher.config.model_dump(), "model": teacher.state_dict()}, path)
    return sum(p.numel() * p.element_size() for p in teacher.parameters())


def measure(recipe: list[str], ds_config: str | None, run_dir: Path, teacher_bytes: int) -> list[dict]:
    """Run the recipe (in 2 processes under DeepSpeed with configs/ds/`ds_config`, else in one); the per-process
    figures (rank, teacher_param_bytes(_total), peak_memory_bytes, distilled_tokens_per_s)."""
    train = [str(ROOT / "train.py"), *recipe]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    if ds_config is None:
        process = subprocess.Popen([sys.executable, *train], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        if status:
            raise RuntimeError(f"train.py failed: {recipe}")
        tokens = json.loads((run_dir / "results.json").read_text())["distilled"]["train_tokens_per_s"]
        return [
            {
                "rank": 0,
                "teacher_param_bytes": teacher_bytes,
                "teacher_param_bytes_total": teacher_bytes,
                "peak_memory_bytes": usage.ru_maxrss * 1024,
                "distilled_tokens_per_s": tokens,
            }
        ]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2"]
    ds = ["--deepspeed", str(ROOT / "configs" / "ds" / ds_config)]
    subprocess.run([*launcher, train[0], *ds, *train[1:]], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "deepspeed.json").read_text())["ranks"]


def markdown(results: dict) -> str:
    lines = [
        (
            f"Teacher {results['teacher']}, {results['steps']} distillation steps, one thread per process;"
            f" {results['machine']}, torch {results['torch']}."
        ),
        "",
        "| run | rank | teacher parameters held | of the teacher | peak memory | distillation tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, ranks in results["runs"].items():
        for r in ranks:
            share = r["teacher_param_bytes"] / r["teacher_param_bytes_total"]
            lines.append(
                f"| {name} | {r['rank']} | {r['teacher_param_bytes'] / 2**20:,.0f} MiB | {share:.0%} |"
                f" {r['peak_memory_bytes'] / 2**20:,.0f} MiB | {r['distilled_tokens_per_s']:,.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
