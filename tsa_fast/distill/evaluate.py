"""Evaluation of a model on a split: perplexity and bits per byte (LM) or accuracy and macro-F1 (classification),
agreement with the teachers (top-1 agreement, mean KL(P_t || P_s) at T = 1), optionally on inputs perturbed
adversarially against the model itself (FGM, `epsilon` per token); inference throughput; and for causal LMs,
metrics of sampled continuations of held-out prompts: the teacher's NLL of them and their distinct-2."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsa_fast.distill.adversarial import adversarial_delta
from tsa_fast.distill.batches import in_order
from tsa_fast.distill.objective import student_head
from tsa_fast.distill.on_policy import IGNORE_INDEX, continuation_batch
from tsa_fast.distill.protocols import Model
from tsa_fast.distill.teachers import Teachers


def evaluate(
    model: Model,
    split: dict[str, Tensor],
    task: str,
    *,
    batch_size: int,
    device: torch.device,
    teachers: Teachers | None = None,
    max_batches: int | None = None,
    epsilon: float | None = None,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Metrics of `model` on `split` (LM: loss, perplexity, and bits_per_byte where the split has `label_bytes`;
    classify: loss, accuracy, macro_f1), plus agreement / kl with `teachers` when given, all over the positions
    whose label is not IGNORE_INDEX. bits_per_byte = total NLL in nats / (ln 2 x the UTF-8 bytes of text the
    predicted tokens stand for): comparable between models of different tokenizers, unlike perplexity. With
    `epsilon`, each batch is first perturbed by FGM against the model's own loss."""
    was_training = model.training
    model.eval()
    loss_sum = count = agree = kl_sum = text_bytes = 0.0
    predictions, targets = [], []
    for batch in in_order(split, batch_size, device, max_batches):
        labels = batch["labels"]
        with autocast():
            logits = _logits(model, batch, task, epsilon).float()
        flat_logits, flat_labels = logits.flatten(0, -2), labels.flatten()
        counted = flat_labels != IGNORE_INDEX  # LM positions whose label is ignore_index count nowhere
        loss_sum += F.cross_entropy(flat_logits, flat_labels, reduction="sum", ignore_index=IGNORE_INDEX).item()
        count += int(counted.sum())
        if "label_bytes" in batch:
            text_bytes += int(batch["label_bytes"].flatten()[counted].sum())
        if task == "classify":
            predictions.append(flat_logits.argmax(-1).cpu())
            targets.append(flat_labels.cpu())
        if teachers is not None:
            with torch.no_grad(), autocast():
                teacher_logits = teachers.targets(batch).full_logits().float().flatten(0, -2)
            teacher_logits, student_logits = teacher_logits[counted], flat_logits[counted]
            log_p_t, log_p_s = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
            agree += (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum().item()
            kl_sum += (log_p_t.exp() * (log_p_t - log_p_s)).sum().item()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation split is empty")
    metrics = {"loss": loss_sum / count}
    if task == "lm":
        metrics["perplexity"] = math.exp(metrics["loss"])
        if text_bytes:
            metrics["bits_per_byte"] = loss_sum / (math.log(2) * text_bytes)
    else:
        predicted, target = torch.cat(predictions), torch.cat(targets)
        metrics["accuracy"] = (predicted == target).double().mean().item()
        metrics["macro_f1"] = macro_f1(predicted, target)
    if teachers is not None:
        metrics["agreement"], metrics["kl"] = agree / count, kl_sum / count
    return metrics


def _logits(model: Model, batch: dict[str, Tensor], task: str, epsilon: float | None) -> Tensor:
    """The model's logits on the batch; with epsilon, on its FGM-perturbed token embeddings."""
    mask = batch.get("attention_mask")
    if epsilon is None:
        with torch.no_grad():
            return student_head(model, model(batch["input_ids"], mask), batch, task)
    embeds = model.embed_tokens(batch["input_ids"]).detach()

    def own_loss(perturbed: Tensor) -> Tensor:
        logits = student_head(model, model(inputs_embeds=perturbed, attention_mask=mask), batch, task)
        return F.cross_entropy(logits.flatten(0, -2).float(), batch["labels"].flatten())

    delta = adversarial_delta(own_loss, embeds, epsilon)
    with torch.no_grad():
        return student_head(model, model(inputs_embeds=embeds + delta, attention_mask=mask), batch, task)


def macro_f1(predicted: Tensor, target: Tensor) -> float:
    """Unweighted mean over the classes present in `target` or `predicted` of 2 TP / (2 TP + FP + FN)."""
    scores = []
    for c in torch.unique(torch.cat([predicted, target])):
        tp = ((predicted == c) & (target == c)).sum().item()
        fp = ((predicted == c) & (target != c)).sum().item()
        fn = ((predicted != c) & (target == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@torch.no_grad()
def throughput(
    models: dict[str, nn.Module],
    batches: list,
    forward: Callable[[nn.Module, Any], Any],
    units: float,
    *,
    repeats: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """`units` (what `batches` hold in all: tokens, sentences) per second of each model running `forward(model,
    batch)` under `autocast` over `batches`, in eval mode (the models are left so). Each model first runs the
    first batch once, untimed (warm-up); then `repeats` rounds time every batch of every model, the models in
    turn, so that the changing load of a shared machine weighs on all of them alike; each batch keeps its
    fastest time (a burst of load spoils one timing, not a model's result), and a model's time is the sum."""
    for model in models.values():
        model.eval()
        with autocast():
            forward(model, batches[0])
    best = {name: [math.inf] * len(batches) for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                with autocast():
                    forward(model, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: units / sum(seconds) for name, seconds in best.items()}


def tokens_per_second(
    models: dict[str, Model],
    split: dict[str, Tensor],
    task: str,
    *,
    batch_size: int,
    device: torch.device,
    batches: int = 4,
    repeats: int = 3,
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Inference throughput (forward + head, `throughput`'s rule) of each model on the same first `batches`
    batches of `split`, in real tokens (attention_mask) where there is padding."""
    data = list(in_order(split, batch_size, device, batches))
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in data)

    def forward(model: Model, batch: dict[str, Tensor]) -> Tensor:
        return student_head(model, model(batch["input_ids"], batch.get("attention_mask")), batch, task)

    return throughput(models, data, forward, tokens, repeats=repeats, device=device, autocast=autocast)


def distinct_n(sequences: list[list[int]], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016) of a set of token sequences: the number of distinct n-grams over all of them
    divided by the number of n-grams (1: no n-gram repeats; 0 when no sequence has n tokens). Raises ValueError
    for n < 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def teacher_nll(
    teacher: Model, sequences: Tensor, prompt_tokens: int, *, eos_id: int | None = None, autocast=contextlib.nullcontext
) -> float:
    """The teacher's mean negative log-likelihood per token of the continuations in `sequences` (B, L) int64
    (the first prompt_tokens of each row are the prompt; a row's tokens after its first eos_id do not count):
    mean over counted tokens x_t of -log P_teacher(x_t | x_<t), in nats. Lower: the continuations are what the
    teacher finds likely."""
    batch = continuation_batch(sequences, prompt_tokens, eos_id)
    was_training = teacher.training
    teacher.eval()
    with autocast():
        logits = teacher.logits(teacher(batch["input_ids"]).hidden).float()
    teacher.train(was_training)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX).item()


def sampled_continuations(
    models: dict[str, Model],
    prompts: Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    seed: int,
    autocast=contextlib.nullcontext,
) -> dict[str, Tensor]:
    """Each model's continuations (B, P + max_new_tokens) of `prompts` (B, P), sampled at `temperature` (0:
    greedy) from a generator seeded by `seed` (the same draws for a given model), for exactly max_new_tokens
    steps."""
    out = {}
    for name, model in models.items():
        generator = torch.Generator(prompts.device).manual_seed(seed)
        with autocast():
            out[name] = model.generate(prompts, max_new_tokens, temperature=temperature, generator=generator)
    return out


def sample_metrics(
    models: dict[str, Model],
    teacher: Model,
    prompts: Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    seed: int,
    eos_id: int | None = None,
    autocast=contextlib.nullcontext,
) -> dict[str, dict[str, float]]:
    """Per model, on its continuations of `prompts` sampled at `temperature` (`sampled_continuations`):
    `sample_teacher_nll` (`teacher_nll`) and `sample_distinct_2` (`distinct_n` of the continuations, each cut
    after its first eos_id)."""
    prompt_tokens = prompts.shape[1]
    sequences = sampled_continuations(
        models, prompts, max_new_tokens, temperature=temperature, seed=seed, autocast=autocast
    )
    metrics = {}
    for name, sequence in sequences.items():
        continuations = [until_eos(row, eos_id) for row in sequence[:, prompt_tokens:].tolist()]
        metrics[name] = {
            "sample_teacher_nll": teacher_nll(teacher, sequence, prompt_tokens, eos_id=eos_id, autocast=autocast),
            "sample_distinct_2": distinct_n(continuations, 2),
        }
    return metrics


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first eos_id (all of them when there is none)."""
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens
