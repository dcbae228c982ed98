"""`python -m tsa_fast.demo`: distill a toy student with the fused loss, on whatever backend applies.

A fixed random "teacher" (a 2-layer MLP language-model head over V tokens) labels random contexts; a
smaller student learns to match its distribution with `tsa_fast.distillation_loss` (forward KL at T = 2
plus a little cross-entropy to the teacher's argmax). The main job until `train.py` lands.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import tsa_fast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch", type=int, default=256, help="rows per step (default 256)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    parser.add_argument("--divergence", default="forward_kl", help="divergence (default forward_kl)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    hidden, console = 64, Console()
    teacher = torch.nn.Sequential(torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, args.vocab))
    student = torch.nn.Linear(hidden, args.vocab)
    teacher.requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    loss_fn = tsa_fast.nn.DistillationLoss(divergence=args.divergence, temperature=2.0, hard_weight=0.1)
    backend = tsa_fast.available_backends(torch.device("cpu"))[0]
    console.print(f"backend: [bold]{backend}[/] (available: {tsa_fast.available_backends(torch.device('cpu'))})")

    def evaluate() -> float:
        with torch.no_grad():
            x = torch.randn(2048, hidden, generator=torch.Generator().manual_seed(1))
            return tsa_fast.distillation_loss(student(x), teacher(x), divergence=args.divergence).item()

    initial, start = evaluate(), time.perf_counter()
    for _ in track(range(args.steps), description="distilling", console=console):
        x = torch.randn(args.batch, hidden)
        teacher_logits = teacher(x)
        loss = loss_fn(student(x), teacher_logits, teacher_logits.argmax(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed, final = time.perf_counter() - start, evaluate()

    table = Table(title=f"toy distillation, V={args.vocab}, {args.steps} steps of {args.batch} rows")
    for column in ("held-out " + args.divergence + " (T=1)", "before", "after", "steps/s"):
        table.add_column(column)
    table.add_row("student vs teacher", f"{initial:.4f}", f"{final:.4f}", f"{args.steps / elapsed:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
