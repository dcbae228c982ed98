"""End to end: `python train.py` (the main job) in CI size, its recipes and options, and kill + resume.

The runs are tiny (vocabulary 512, widths 32, a few steps) but real: the stdlib corpus, a trained
tokenizer, a trained and cached teacher, distilled and baseline students, evaluation and reports.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tsa_fast.distill.metrics import read_metrics
from tsa_fast.recipes.lm import RecipeConfig, load_config, run

ROOT = Path(__file__).resolve().parents[1]

TINY_TEACHER = "{d_model: 32, n_layers: 2, n_heads: 2}"
TINY = [
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.max_train_tokens=20000",
    "data.max_train_examples=200",
    f"teachers.0.model={TINY_TEACHER}",
    "student.model.d_model=32",
    "student.model.n_layers=1",
    "student.model.n_heads=2",
    "teacher_training.steps=6",
    "teacher_training.batch_size=8",
    "teacher_training.eval_batches=2",
    "training.steps=6",
    "training.batch_size=8",
    "training.eval_every=3",
    "training.eval_batches=2",
    "training.log_every=1",
    "training.checkpoint_every=2",
    "logging.progress=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One corpus / tokenizer / teacher cache for the whole module (what a user's second run reuses)."""
    return str(tmp_path_factory.mktemp("cache"))


def train_py(*args: str, cwd: Path = ROOT, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )


def finished(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def test_default_recipe_file_is_the_builtin_recipe():
    assert load_config(ROOT / "configs" / "stdlib_lm.yaml") == RecipeConfig()


@pytest.mark.parametrize("recipe", ["stdlib_lm", "classify"])
def test_recipe_runs_end_to_end(recipe, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "--config",
        str(ROOT / "configs" / f"{recipe}.yaml"),
        *TINY,
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
    ]
    finished(train_py(*args))
    results = json.loads((out / "results.json").read_text())
    comparison = {"baseline_teacher_layers", "distilled_teacher_layers"} if recipe == "stdlib_lm" else set()
    assert set(results) == {"teacher", "distilled", "baseline"} | comparison
    metric = "validation_perplexity" if recipe == "stdlib_lm" else "validation_accuracy"
    for name, row in results.items():
        assert row[metric] > 0 and row["parameters"] > 0 and row["inference_tokens_per_s"] > 0, name
    assert results["distilled"]["parameters"] < results["teacher"]["parameters"]
    # The share of the baseline-teacher gap each model closes: the teacher all, the baseline none.
    for split in ("validation", "test"):
        key, closed = f"{split}_{metric.split('_')[1]}", f"{split}_gap_closed"
        assert results["teacher"][closed] == 1 and results["baseline"][closed] == 0
        base, gap = results["baseline"][key], results["baseline"][key] - results["teacher"][key]
        assert results["distilled"][closed] == pytest.approx((base - results["distilled"][key]) / gap)
    assert "val gap closed" in (out / "results.md").read_text()
    assert 0 <= results["distilled"]["validation_agreement"] <= 1
    assert (out / "curves.png").stat().st_size > 0 and "| distilled |" in (out / "results.md").read_text()
    rows = read_metrics(out / "distilled" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and all(r["loss"] for r in rows)
    # The table's validation is the distillation's final validation (evaluated once, the whole split).
    assert float(rows[-1]["val_agreement"]) == pytest.approx(results["distilled"]["validation_agreement"])
    second = finished(train_py(*args[:-2], f"output_dir={tmp_path / 'again'}", f"data.cache_dir={cache_dir}"))
    assert "loaded the cached teacher" in second


def test_cross_tokenizer_recipe_end_to_end(tmp_path):
    """configs/cross_tokenizer.yaml in CI size: the teacher, trained on its own tokenizer and cached by a first
    run, is loaded (not retrained) by the next; the student of another vocabulary is distilled from it, against the
    same student alone and in the teacher's tokenizer; every model has bits per byte on validation and test, and
    each phase directory generates with its own tokenizer."""
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    cross = ["--config", str(ROOT / "configs" / "cross_tokenizer.yaml"), *TINY, "data.vocab_size=400"]
    cross += ["teachers.0.tokenizer.vocab_size=512", cache]
    first = finished(train_py(*cross, "baseline=false", "same_tokenizer_compare=false", f"output_dir={tmp_path / 'a'}"))
    assert "loaded the cached teacher" not in first
    out = tmp_path / "cross"
    output = finished(train_py(*cross, f"output_dir={out}"))
    assert "loaded the cached teacher" in output and "teacher tokens (vocabulary 512) aligned" in output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "distilled", "distilled_same_tokenizer", "baseline"}
    for name, row in results.items():
        assert 0 < row["validation_bits_per_byte"] < 16 and 0 < row["test_bits_per_byte"] < 16, name
    for name in ("distilled", "distilled_same_tokenizer", "baseline"):
        assert results[name]["train_ms_per_step"] > 0, name
    assert "validation_agreement" not in results["distilled"]  # no agreement across vocabularies
    # Perplexities of two tokenizers are not comparable: the gap closed is in bits per byte.
    key, base = "validation_bits_per_byte", results["baseline"]["validation_bits_per_byte"]
    closed = (base - results["distilled"][key]) / (base - results["teacher"][key])
    assert results["distilled"]["validation_gap_closed"] == pytest.approx(closed)
    assert 0 <= results["distilled_same_tokenizer"]["validation_agreement"] <= 1
    assert "bits/byte" in (out / "results.md").read_text()
    rows = read_metrics(out / "distilled" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and all(float(r["loss"]) > 0 for r in rows)
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 400
    assert Tokenizer.from_file(str(out / "teacher_0" / "tokenizer.json")).get_vocab_size() == 512
    for phase in ("teacher_0", "distilled"):
        command = [sys.executable, "-m", "tsa_fast.generate", str(out), "--phase", phase, "--prompt", "Return the"]
        cli = subprocess.run([*command, "--temperature", "0", "--max-new-tokens", "4"], capture_output=True, text=True)
        assert cli.returncode == 0 and cli.stdout.startswith("Return the"), cli.stderr


def test_run_directory_generates_and_reports_completions(cache_dir, tmp_path):
    """A run directory is what `python -m tsa_fast.generate` reads: tokenizer.json at the top, each phase a
    Transformer directory (the cached teacher's too); the results hold greedy completions and sample metrics."""
    out = tmp_path / "run"
    finished(train_py(*TINY, "samples.prompt_tokens=8", f"output_dir={out}", f"data.cache_dir={cache_dir}"))
    assert (out / "tokenizer.json").is_file()
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher", "distilled", "baseline"):
        row = results[name]
        assert row["sample_teacher_nll"] > 0 and 0 < row["sample_distinct_2"] <= 1, name
        assert len(row["completions"]) == 3 and all(c["prompt"] for c in row["completions"]), name
    markdown = (out / "results.md").read_text()
    assert "Greedy completions" in markdown and results["distilled"]["completions"][0]["prompt"] in markdown
    prompt = results["teacher"]["completions"][0]["prompt"]
    for phase, model in (("distilled", "distilled"), ("baseline", "baseline"), ("teacher_0", "teacher")):
        command = [sys.executable, "-m", "tsa_fast.generate", str(out), "--phase", phase, "--prompt", prompt]
        command += ["--temperature", "0", "--max-new-tokens", "24"]
        cli = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
        # Greedy, 24 = seq_len - prompt tokens new tokens: the report's completion (the prompt's text encodes
        # back to the prompt's tokens here).
        assert cli.stdout == prompt + results[model]["completions"][0]["completion"] + "\n", phase
        assert phase in cli.stderr


def test_bad_data_is_a_clear_error_before_training(tmp_path):
    process = train_py(f"data.source={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'run'}")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "missing.jsonl" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "teacher_0").exists()


def test_bad_option_is_a_clear_error():
    output, _ = train_py("training.stepz=3").communicate(timeout=120)
    assert "stepz" in output and "Traceback" not in output


def test_killed_run_resumes_on_the_same_curve(cache_dir, tmp_path):
    """SIGKILL the distillation phase after a checkpoint, resume: the metrics equal an uninterrupted run's."""
    steps = ["training.steps=12", "training.checkpoint_every=3", "training.eval_every=6"]
    common = [*TINY, *steps, f"data.cache_dir={cache_dir}", "baseline=false"]
    finished(train_py(*common, f"output_dir={tmp_path / 'straight'}"))

    out = tmp_path / "killed"
    process = train_py(*common, f"output_dir={out}")
    checkpoint = out / "distilled" / "checkpoint.pt"
    deadline = time.time() + 300
    while not (checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 3):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(checkpoint, weights_only=True)["step"] < 12, "killed too late to test resuming"
    finished(train_py(*common, f"output_dir={out}", "--resume"))

    straight, resumed = (read_metrics(tmp_path / name / "distilled" / "metrics.csv") for name in ("straight", "killed"))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a.get("val_perplexity") == b.get("val_perplexity"), (a, b)


@pytest.mark.parametrize(
    "options",
    [
        ["adversarial.method=fgm", "adversarial.epsilon=0.2"],
        ["adversarial.method=pgd", "adversarial.steps=2", "adversarial.compare=false"],
        ["teacher_cache.enabled=true", "teacher_cache.top_k=8"],
        [
            f"teachers=[{{seed: 0, model: {TINY_TEACHER}}}, {{seed: 1, weight: 2.0, model: {TINY_TEACHER}}}]",
            "loss.divergence=jsd",
        ],
        [
            "loss.hidden_weight=1.0",
            "loss.attention_weight={start: 1.0, end: 0.0}",
            "student.model.d_model=16",
            "loss.attention_relations=[qq, kk, vv]",
            "loss.relation_heads=2",
        ],
        [
            "student.init=teacher_layers",
            "student.model.n_layers=1",
            "loss.fused=false",
            "loss.temperature={start: 4, end: 1}",
        ],
        ["precision=bf16", "loss.hidden_weight=1.0", "loss.attention_weight=1.0", "training.grad_accum=2"],
    ],
    ids=["fgm", "pgd", "teacher_cache", "two_teachers", "hidden_attention", "teacher_layers_unfused", "bf16_accum"],
)
def test_recipe_options(options, cache_dir, tmp_path):
    overrides = [*TINY, *options, f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}", "baseline=false"]
    results = run(load_config(None, overrides))
    assert "distilled" in results
    assert all(v == v for row in results.values() for v in row.values()), "NaN in results"
    if "adversarial.method=fgm" in options:
        assert set(results) == {"teacher", "distilled", "distilled_no_adversarial"}
        assert "validation_perturbed_perplexity" in results["distilled"]
