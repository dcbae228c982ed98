"""On-policy distillation (GKD), sequence-level KD and the sampled-continuation metrics: the engine pieces
(`tsa_fast.distill.on_policy`, `tsa_fast.distill.sequence_kd`, `tsa_fast.distill.evaluate`) on hand-checked
cases, and tiny end-to-end recipe runs."""

import json
from pathlib import Path

import pytest
import torch

from tsa_fast.distill.config import LoggingConfig, LossConfig, OnPolicyConfig, TrainingConfig
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.evaluate import distinct_n, sample_metrics, teacher_nll, until_eos
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.on_policy import (
    IGNORE_INDEX,
    PROMPT_LENGTHS,
    continuation_batch,
    is_on_policy,
    left_padded_prompts,
    on_policy_batch,
    right_aligned,
    sample_generator,
)
from tsa_fast.distill.sequence_kd import sequence_kd_split, teacher_completions
from tsa_fast.distill.teachers import Teachers
from tsa_fast.models import Transformer, TransformerConfig

CPU = torch.device("cpu")
VOCAB, SEQ = 61, 12
TEACHER = TransformerConfig(vocab_size=VOCAB, max_seq_len=SEQ, d_model=32, n_layers=2, n_heads=4)
STUDENT = TransformerConfig(vocab_size=VOCAB, max_seq_len=SEQ, d_model=16, n_layers=1, n_heads=2)
QUIET = LoggingConfig(progress=False, tensorboard=False)


def lm_split(n, seed):
    ids = torch.randint(2, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def tiny_data():
    return type("Data", (), {"task": "lm", "train": lm_split(32, 0), "validation": lm_split(8, 1), "eos_id": 1})()


def model(config, seed):
    torch.manual_seed(seed)
    return Transformer(config)


# --- batches of continuations ---------------------------------------------------------------------------


def test_continuation_labels_are_the_generated_tokens_only():
    sequences = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    batch = continuation_batch(sequences, prompt_tokens=3)
    assert torch.equal(batch["input_ids"], sequences)
    ignore = IGNORE_INDEX
    # Position i predicts token i + 1: positions 0, 1 predict prompt tokens; position 2 predicts the first
    # generated one (8); the last position predicts nothing.
    assert batch["labels"].tolist() == [[ignore, ignore, 8, 9, 10, ignore], [ignore, ignore, 14, 15, 16, ignore]]


def test_continuation_labels_stop_after_the_first_eos():
    eos = 1
    sequences = torch.tensor([[5, 6, 1, 7, 1, 8], [5, 6, 7, 1, 9, 9], [1, 6, 7, 8, 9, 10]])
    labels = continuation_batch(sequences, prompt_tokens=2, eos_id=eos)["labels"].tolist()
    ignore = IGNORE_INDEX
    assert labels[0] == [ignore, 1, ignore, ignore, ignore, ignore]  # the EOS itself is a label
    assert labels[1] == [ignore, 7, 1, ignore, ignore, ignore]
    assert labels[2] == [ignore, 7, 8, 9, 10, ignore]  # an EOS in the prompt does not count


@pytest.mark.parametrize("prompt_tokens", [0, 6])
def test_continuation_batch_rejects_a_prompt_that_leaves_nothing(prompt_tokens):
    with pytest.raises(ValueError, match="prompt_tokens"):
        continuation_batch(torch.zeros(2, 6, dtype=torch.int64), prompt_tokens)


def test_prompts_of_different_lengths_are_left_padded_then_realigned():
    """Prompt lengths 3 and 1: generation sees them left-padded (mask False on the padding); the sequences are
    shifted back so that each row starts with its prompt; the labels are each row's continuation (up to and
    including its first EOS), the attention mask covers prompt and continuation."""
    ignore = IGNORE_INDEX
    input_ids, lengths = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), torch.tensor([3, 1])
    prompts, mask = left_padded_prompts(input_ids, lengths)
    assert prompts.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    generated = torch.cat((prompts, torch.tensor([[20, 21], [30, 31]])), dim=1)
    aligned = right_aligned(generated, lengths)
    assert aligned.tolist() == [[5, 6, 7, 20, 21], [9, 30, 31, 0, 0]]
    batch = continuation_batch(aligned, lengths, eos_id=30)
    assert batch["labels"].tolist() == [[ignore, ignore, 20, 21, ignore], [30, ignore, ignore, ignore, ignore]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert batch[PROMPT_LENGTHS].tolist() == [3, 1]
    with pytest.raises(ValueError, match="prompt lengths must be in"):
        left_padded_prompts(input_ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="prompt_tokens must be in"):
        continuation_batch(aligned, torch.tensor([5, 1]))


def test_on_policy_batch_of_prompts_of_different_lengths():
    """A batch with PROMPT_LENGTHS (chat data): the engine's Transformer continues each row's own prompt, greedy
    as it would alone, for exactly max_new_tokens steps."""
    student = model(STUDENT, 0)
    batch = {**lm_split(3, 4), PROMPT_LENGTHS: torch.tensor([2, 5, 3])}
    config = OnPolicyConfig(fraction=1.0, max_new_tokens=4, sample_temperature=0.0)
    out = on_policy_batch(student, batch, config, generator=None)
    assert out["input_ids"].shape == (3, 5 + 4) and out["attention_mask"].sum(dim=1).tolist() == [6, 9, 7]
    for i, p in enumerate([2, 5, 3]):
        alone = student.generate(batch["input_ids"][i : i + 1, :p], 4, temperature=0.0)
        assert torch.equal(out["input_ids"][i, : p + 4], alone[0])
        counted = (out["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert counted == list(range(p - 1, p + 3))


def test_on_policy_selection_is_reproducible_and_has_the_fraction():
    draws = [is_on_policy(0.3, 7, m) for m in range(2000)]
    assert draws == [is_on_policy(0.3, 7, m) for m in range(2000)]
    assert draws != [is_on_policy(0.3, 8, m) for m in range(2000)]
    assert 0.26 < sum(draws) / len(draws) < 0.34
    assert not any(is_on_policy(0.0, 7, m) for m in range(100))
    assert all(is_on_policy(1.0, 7, m) for m in range(100))
    with pytest.raises(ValueError, match="fraction"):
        is_on_policy(1.5, 0, 0)


def test_on_policy_batch_is_the_students_continuation_of_the_prompt():
    student = model(STUDENT, 0)
    batch = {k: v[:4] for k, v in lm_split(4, 2).items()}
    config = OnPolicyConfig(fraction=1.0, prompt_tokens=4, sample_temperature=1.0)
    out = on_policy_batch(student, batch, config, generator=sample_generator(0, 3, 0, CPU))
    again = on_policy_batch(student, batch, config, generator=sample_generator(0, 3, 0, CPU))
    other = on_policy_batch(student, batch, config, generator=sample_generator(0, 4, 0, CPU))
    assert out["input_ids"].shape == (4, SEQ) and out["on_policy"]
    assert torch.equal(out["input_ids"][:, :4], batch["input_ids"][:, :4])
    assert (out["labels"][:, :3] == IGNORE_INDEX).all() and (out["labels"][:, -1] == IGNORE_INDEX).all()
    assert torch.equal(out["labels"][:, 3:-1], out["input_ids"][:, 4:])
    assert torch.equal(out["input_ids"], again["input_ids"]) and not torch.equal(out["input_ids"], other["input_ids"])
    # Greedy: exactly the model's own greedy generation.
    greedy = on_policy_batch(student, batch, config.model_copy(update={"sample_temperature": 0.0}), generator=None)
    assert torch.equal(greedy["input_ids"], student.generate(batch["input_ids"][:, :4], SEQ - 4, temperature=0.0))


def test_on_policy_batch_rejects_padded_prompts():
    batch = {**lm_split(2, 3), "attention_mask": torch.ones(2, SEQ, dtype=torch.bool)}
    batch["attention_mask"][1, 2] = False
    with pytest.raises(ValueError, match="prompt_tokens=4 real tokens"):
        on_policy_batch(model(STUDENT, 0), batch, OnPolicyConfig(fraction=1.0, prompt_tokens=4), generator=None)


# --- the loop --------------------------------------------------------------------------------------------


def distill(tmp_path, loss: LossConfig, steps: int, resume_at: int | None = None):
    """Distill a tiny student for `steps` (killed and resumed at `resume_at`); (losses, parameters)."""
    data, teacher = tiny_data(), model(TEACHER, 1)
    training = TrainingConfig(steps=steps, batch_size=4, warmup_steps=0, checkpoint_every=1, eval_every=100)

    def distiller(out_dir):
        student = model(STUDENT, 2)
        phase = Phase("p", out_dir, training, 0, CPU, logging=QUIET)
        objective = DistillationObjective(loss, "lm", STUDENT, TEACHER)
        return Distiller(student, objective, data, phase, Teachers([teacher], [1.0], "lm"))

    tmp_path.mkdir(parents=True, exist_ok=True)
    losses, d = [], distiller(tmp_path)
    for _ in range(steps):
        losses.append(d.train_step()[0].item())
        if d.step == resume_at:
            d.save_checkpoint()
            d = distiller(tmp_path)
            d.load_checkpoint()
    return losses, torch.cat([p.detach().flatten() for p in d.model.parameters()])


def test_fraction_zero_is_the_off_policy_recipe_bit_for_bit(tmp_path):
    off, off_params = distill(tmp_path / "a", LossConfig(), 3)
    zero = LossConfig(on_policy=OnPolicyConfig(fraction=0.0, prompt_tokens=4, sample_temperature=0.5))
    same, same_params = distill(tmp_path / "b", zero, 3)
    assert off == same and torch.equal(off_params, same_params)
    on, _ = distill(tmp_path / "c", LossConfig(on_policy=OnPolicyConfig(fraction=1.0, prompt_tokens=4)), 3)
    assert on != off  # the test can tell on-policy batches from off-policy ones


def test_on_policy_loss_is_the_divergence_on_the_generated_tokens(tmp_path):
    """The objective on an on-policy batch: the reverse KL over the generated positions, no cross-entropy."""
    teacher, student = model(TEACHER, 1), model(STUDENT, 2)
    config = LossConfig(divergence="reverse_kl", temperature=1.0, hard_weight=0.5)
    batch = on_policy_batch(
        student, lm_split(3, 4), OnPolicyConfig(fraction=1.0, prompt_tokens=5), generator=sample_generator(0, 0, 0, CPU)
    )
    targets = Teachers([teacher], [1.0], "lm").targets(batch, fused=True)
    loss = DistillationObjective(config, "lm", STUDENT, TEACHER).output_loss(
        student, student(batch["input_ids"]), batch, targets, 0.0
    )
    with torch.no_grad():
        log_p_s = student.logits(student(batch["input_ids"]).hidden).double().log_softmax(-1)
        log_p_t = teacher.logits(teacher(batch["input_ids"]).hidden).double().log_softmax(-1)
    counted = batch["labels"] != IGNORE_INDEX
    reverse_kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)[counted].mean()
    assert counted.sum() == 3 * (SEQ - 5)
    assert loss.item() == pytest.approx(reverse_kl.item(), rel=1e-4)


def test_on_policy_batches_begin_at_start_step(tmp_path, monkeypatch):
    """start_step=2 with fraction 1: steps 0 and 1 are the off-policy recipe's, bit for bit; every later step
    is on-policy (one generation per step)."""
    import tsa_fast.distill.distiller as distiller_module

    generated = []
    real = distiller_module.on_policy_batch
    monkeypatch.setattr(distiller_module, "on_policy_batch", lambda *a, **k: generated.append(1) or real(*a, **k))
    off, _ = distill(tmp_path / "a", LossConfig(), 2)
    assert not generated
    warm = LossConfig(on_policy=OnPolicyConfig(fraction=1.0, prompt_tokens=4, start_step=2))
    losses, _ = distill(tmp_path / "b", warm, 4)
    assert losses[:2] == off and len(generated) == 2
    on, _ = distill(tmp_path / "c", LossConfig(on_policy=OnPolicyConfig(fraction=1.0, prompt_tokens=4)), 4)
    assert losses[2:] != on[2:] and len(generated) == 6


def test_on_policy_run_resumes_on_the_same_curve(tmp_path):
    loss = LossConfig(on_policy=OnPolicyConfig(fraction=0.5, prompt_tokens=4))
    straight, straight_params = distill(tmp_path / "a", loss, 6)
    resumed, resumed_params = distill(tmp_path / "b", loss, 6, resume_at=3)
    assert straight == resumed and torch.equal(straight_params, resumed_params)


# --- metrics ---------------------------------------------------------------------------------------------


def test_distinct_2_of_known_sequences():
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[1, 1, 1, 1]]) == pytest.approx(1 / 3)  # (1, 1) three times
    assert distinct_n([[1, 2, 1, 2], [2, 1]]) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (2,1)
    assert distinct_n([[7], []]) == 0.0
    assert distinct_n([[1, 2, 3, 1, 2, 3]], n=3) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="n must be"):
        distinct_n([[1, 2]], n=0)
    assert until_eos([4, 5, 1, 6], 1) == [4, 5] and until_eos([4, 5], 1) == [4, 5] and until_eos([4, 1], None) == [4, 1]


def test_teacher_nll_is_the_direct_computation():
    teacher = model(TEACHER, 1)
    sequences = torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    sequences[1, 7] = 1  # EOS: row 1 counts tokens 4..7 only
    nll = teacher_nll(teacher, sequences, prompt_tokens=4, eos_id=1)
    with torch.no_grad():
        log_p = teacher.logits(teacher(sequences).hidden).double().log_softmax(-1)
    terms = [-log_p[b, t - 1, sequences[b, t]] for b in range(3) for t in range(4, 10) if not (b == 1 and t > 7)]
    assert nll == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_sample_metrics_of_the_teacher_itself_are_its_own_sample_nll():
    teacher, student = model(TEACHER, 1), model(STUDENT, 2)
    prompts = lm_split(4, 6)["input_ids"][:, :4]
    metrics = sample_metrics({"teacher": teacher, "student": student}, teacher, prompts, 6, temperature=1.0, seed=3)
    again = sample_metrics({"teacher": teacher, "student": student}, teacher, prompts, 6, temperature=1.0, seed=3)
    assert metrics == again
    samples = teacher.generate(prompts, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert metrics["teacher"]["sample_teacher_nll"] == pytest.approx(teacher_nll(teacher, samples, 4))
    assert metrics["teacher"]["sample_distinct_2"] == distinct_n(samples[:, 4:].tolist())
    assert set(metrics["student"]) == {"sample_teacher_nll", "sample_distinct_2"}


def test_teacher_nll_is_lowest_for_the_teachers_greedy_choice():
    """A sanity check with a known answer: the teacher's greedy continuation is, token by token, its most likely,
    so its NLL is below that of random continuations of the same prompts."""
    teacher = model(TEACHER, 1)
    prompts = lm_split(4, 7)["input_ids"][:, :4]
    greedy = teacher.generate(prompts, 6, temperature=0.0)
    random = torch.cat([prompts, torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))], 1)
    assert teacher_nll(teacher, greedy, 4) < teacher_nll(teacher, random, 4)
    with torch.no_grad():
        logits = teacher.logits(teacher(greedy).hidden)
    assert torch.equal(logits[:, 3:-1].argmax(-1), greedy[:, 4:])


# --- sequence-level KD -----------------------------------------------------------------------------------


class CountingTeacher(torch.nn.Module):
    """A teacher whose generate counts its calls and raises at call `fail_at` (an interrupted build)."""

    def __init__(self, teacher: Transformer, fail_at: int | None = None):
        super().__init__()
        self.teacher, self.calls, self.fail_at = teacher, 0, fail_at

    def generate(self, prompts, max_new_tokens, **options):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.teacher.generate(prompts, max_new_tokens, **options)


def completions(teacher, directory, fingerprint="a", temperature=1.0):
    split = lm_split(10, 8)
    return teacher_completions(
        teacher,
        split,
        directory,
        prompt_tokens=4,
        max_new_tokens=None,
        temperature=temperature,
        fingerprint=fingerprint,
        batch_size=3,
        device=CPU,
        progress=False,
    )


def test_sequence_kd_cache_resumes_and_is_keyed_by_its_fingerprint(tmp_path):
    teacher = model(TEACHER, 1)
    straight = completions(CountingTeacher(teacher), tmp_path / "straight")
    prompts = lm_split(10, 8)["input_ids"][:, :4]
    assert straight.shape == (10, SEQ) and torch.equal(straight[:, :4], prompts)
    # The teacher's own samples: batch b drawn from a generator of (seed, b); 4 batches of at most 3 rows.
    assert not torch.equal(straight[:3, 4:], teacher.generate(prompts[:3], SEQ - 4, temperature=0.0)[:, 4:])

    killed = CountingTeacher(teacher, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        completions(killed, tmp_path / "resumed")
    resuming = CountingTeacher(teacher)
    resumed = completions(resuming, tmp_path / "resumed")
    assert resuming.calls == 2 and torch.equal(resumed, straight)  # batches 3 and 4 only, the same tokens

    loading = CountingTeacher(teacher)
    assert torch.equal(completions(loading, tmp_path / "straight"), straight) and loading.calls == 0
    rebuilt = CountingTeacher(teacher)
    greedy = completions(rebuilt, tmp_path / "straight", fingerprint="b", temperature=0.0)
    assert rebuilt.calls == 4 and torch.equal(greedy, teacher.generate(prompts, SEQ - 4, temperature=0.0))


def test_sequence_kd_split_trains_on_the_completion():
    sequences = torch.tensor([[5, 6, 7, 1, 8, 9]])
    split = sequence_kd_split(sequences, 2, eos_id=1)
    assert split["labels"].tolist() == [[IGNORE_INDEX, 7, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


# --- recipes end to end ----------------------------------------------------------------------------------

RECIPE = [
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.max_train_tokens=20000",
    "data.max_train_examples=200",
    "teachers.0.model.d_model=32",
    "teachers.0.model.n_layers=2",
    "teachers.0.model.n_heads=2",
    "student.model.d_model=32",
    "student.model.n_layers=1",
    "student.model.n_heads=2",
    "teacher_training.steps=6",
    "teacher_training.batch_size=8",
    "training.steps=4",
    "training.batch_size=8",
    "training.eval_batches=2",
    "logging.progress=false",
    "logging.tensorboard=false",
    "samples.prompt_tokens=8",
    "samples.prompts=4",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def test_on_policy_recipe_runs_side_by_side(cache_dir, tmp_path):
    from tsa_fast.recipes.lm import load_config, run

    options = ["loss.on_policy.fraction=1.0", "loss.on_policy.prompt_tokens=8", "on_policy_compare=true"]
    results = run(load_config(None, [*RECIPE, *options, f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"]))
    comparison = {"baseline_teacher_layers", "distilled_teacher_layers"}  # the built-in recipe's `students`
    assert set(results) == {"teacher", "distilled", "distilled_off_policy", "baseline"} | comparison
    for row in results.values():
        assert row["sample_teacher_nll"] > 0 and 0 < row["sample_distinct_2"] <= 1
    # Same initialization and data order: only the on-policy batches make the two distilled students differ.
    assert results["distilled"]["validation_loss"] != results["distilled_off_policy"]["validation_loss"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| distilled_off_policy |" in markdown and "teacher NLL of samples" in markdown


def test_on_policy_recipe_file_loads():
    from tsa_fast.recipes.lm import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "stdlib_lm_on_policy.yaml")
    assert config.on_policy_compare and config.loss.on_policy.fraction == 0.5 and config.baseline


def test_sequence_kd_recipe_trains_on_the_teachers_completions(cache_dir, tmp_path):
    from tsa_fast.recipes.lm import load_config, run

    options = ["loss.sequence_kd.enabled=true", "loss.sequence_kd.prompt_tokens=8", "baseline=false"]
    overrides = [*RECIPE, *options, f"data.cache_dir={cache_dir}"]
    results = run(load_config(None, [*overrides, f"output_dir={tmp_path / 'a'}"]))
    assert set(results) == {"teacher", "distilled"}
    caches = list((Path(cache_dir) / "sequence_kd").iterdir())
    assert len(caches) == 1 and json.loads((caches[0] / "meta.json").read_text())["shape"][1] == 32
    # A second run reuses the cached completions: the same training, the same result.
    again = run(load_config(None, [*overrides, f"output_dir={tmp_path / 'b'}"]))
    assert again["distilled"]["validation_loss"] == results["distilled"]["validation_loss"]
    assert list((Path(cache_dir) / "sequence_kd").iterdir()) == caches


def test_generating_options_are_checked():
    from tsa_fast.recipes.lm import load_config

    with pytest.raises(ValueError, match="loss.on_policy.prompt_tokens=32 must be less than data.seq_len=32"):
        load_config(None, ["data.seq_len=32", "loss.on_policy.fraction=0.5", "loss.on_policy.prompt_tokens=32"])
    with pytest.raises(ValueError, match="teacher_cache"):
        load_config(None, ["loss.sequence_kd.enabled=true", "teacher_cache.enabled=true"])
    with pytest.raises(ValueError, match="on_policy_compare"):
        load_config(None, ["on_policy_compare=true"])
    with pytest.raises(ValueError, match="fraction"):
        load_config(None, ["loss.on_policy.fraction=1.5"])
