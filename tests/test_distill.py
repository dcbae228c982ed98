"""The distillation engine's parts: config, schedules, data order, teacher mixtures and cache, the objective,
adversarial perturbations, metrics, checkpoints. End-to-end runs of train.py are in test_train.py."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close

from tsa_fast.distill.adversarial import adversarial_delta
from tsa_fast.distill.batches import in_order, take, training_indices
from tsa_fast.distill.config import LoggingConfig, LossConfig, Schedule, TrainingConfig, value_at
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.evaluate import macro_f1, throughput
from tsa_fast.distill.metrics import MetricsLog, read_metrics
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.teacher_cache import TopkTeacherCache
from tsa_fast.distill.teachers import Teachers, mixture_logits
from tsa_fast.models import Transformer, TransformerConfig
from tsa_fast.recipes.lm import RecipeConfig, TeacherConfig, load_config
from tsa_fast.reference.distillation_loss import distillation_loss as reference_distillation_loss

TINY = dict(vocab_size=61, max_seq_len=12, d_model=32, n_layers=2, n_heads=4)


def lm_split(n=10, seq=12, vocab=61):
    ids = torch.randint(0, vocab, (n, seq + 1))
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


# --- config --------------------------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\ntraining:\n  steps: 7\nloss:\n  divergence: jsd\n")
    config = load_config(path, ["training.lr=3e-4", "loss.temperature={start: 4, end: 1}", "teachers.0.seed=5"])
    assert (config.name, config.training.steps, config.training.lr) == ("x", 7, 3e-4)
    assert config.loss.divergence == "jsd" and config.loss.temperature == Schedule(start=4, end=1)
    assert config.teachers[0].seed == 5 and config.teachers[0].model == TeacherConfig().model
    assert load_config() == RecipeConfig()


def test_a_section_given_in_part_keeps_the_recipe_defaults():
    config, default = (
        load_config(None, ["data.cache_dir=/c", "student.model.d_model=32", "training.steps=7"]),
        RecipeConfig(),
    )
    assert (config.data.cache_dir, config.data.vocab_size) == ("/c", default.data.vocab_size)
    assert (config.student.model.d_model, config.student.model.n_heads) == (32, default.student.model.n_heads)
    assert (config.training.steps, config.training.eval_batches) == (7, default.training.eval_batches)
    assert config.teacher_training == default.teacher_training and config.loss == default.loss


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["training.stepz=3"], "stepz"),
        (["training.steps=0"], "steps"),
        (["loss.divergence=kl"], "divergence"),
        (["nonsense"], "key=value"),
        (["teachers.3.seed=1"], "not an index"),
        (["teacher_cache.enabled=true", "loss.hidden_weight=1"], "hidden_weight"),
        (["teacher_cache.enabled=true", "data.task=classify"], "task"),
        (["student.init=teacher_layers", "teachers=[{}, {}]"], "exactly one teacher"),
        (["student.model.n_heads=3"], "n_heads"),
        (["students=[{name: baseline, distilled: false, init: random}]"], "students.*new row name"),
        (["students=[{name: a, distilled: true, init: random}, {name: a, distilled: false, init: random}]"], "unique"),
    ],
)
def test_config_errors_name_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_every_option_is_documented():
    """Every field of every recipe section has a description (and, being a pydantic field, a typed default)."""
    import inspect

    import pydantic

    from tsa_fast.distill import config, data
    from tsa_fast.models import transformer
    from tsa_fast.recipes import classify, lm, sentence_embedding
    from tsa_fast.recipes import config as recipe_config

    undocumented = [
        f"{model.__name__}.{name}"
        for module in (config, data, recipe_config, lm, classify, sentence_embedding, transformer)
        for model in vars(module).values()
        if inspect.isclass(model) and issubclass(model, pydantic.BaseModel) and model.__module__ == module.__name__
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert not undocumented


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_schedules():
    assert value_at(2.5, 0.7) == 2.5
    linear, cosine = Schedule(start=4, end=1), Schedule(start=4, end=1, shape="cosine")
    assert [linear.at(p) for p in (0, 0.5, 1)] == [4, 2.5, 1]
    assert cosine.at(0) == 4 and cosine.at(1) == 1 and math.isclose(cosine.at(0.5), 2.5)
    assert cosine.at(0.25) > linear.at(0.25)  # slow start


# --- data order ------------------------------------------------------------------------------------------


def test_training_order_is_a_function_of_seed_and_step():
    n, batch = 10, 4
    stream = torch.cat([training_indices(n, batch, micro, seed=3) for micro in range(5)])
    assert torch.equal(stream, torch.cat([training_indices(n, batch, micro, seed=3) for micro in range(5)]))
    for epoch in range(2):  # every epoch is a permutation of all examples
        assert sorted(stream[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])
    assert not torch.equal(stream, torch.cat([training_indices(n, batch, m, seed=4) for m in range(5)]))


def test_take_and_in_order():
    split = lm_split(n=5)
    batches = list(in_order(split, 2, torch.device("cpu")))
    assert [len(b["index"]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), split["input_ids"])
    picked = take(split, torch.tensor([4, 0]), torch.device("cpu"))
    assert torch.equal(picked["labels"], split["labels"][[4, 0]])
    assert len(list(in_order(split, 2, torch.device("cpu"), max_batches=1))) == 1


# --- teachers ----------------------------------------------------------------------------------------------


def test_mixture_logits_softmax_is_the_mixture():
    a, b = torch.randn(3, 7) * 4, torch.randn(3, 7) * 4
    T, w = 2.0, [0.25, 0.75]
    mixed = mixture_logits([a, b], [math.log(x) for x in w], T)
    expected = w[0] * torch.softmax(a / T, -1) + w[1] * torch.softmax(b / T, -1)
    assert_rel_close(torch.softmax(mixed / T, -1), expected, 1e-6, "mixture")


def test_teachers_targets_forms():
    torch.manual_seed(0)
    models = [Transformer(TransformerConfig(**TINY)) for _ in range(2)]
    batch = lm_split(n=3)
    one = Teachers(models[:1], [1.0], "lm")
    fused = one.targets(batch, 2.0, fused=True, hidden_states=True, qkv=True)
    assert fused.logits is None and fused.weight is models[0].lm_head_weight
    assert len(fused.hidden_states) == 3 and len(fused.qkv) == 2
    plain = one.targets(batch, 2.0)
    assert_rel_close(fused.full_logits(), plain.logits, 1e-6, "fused vs plain")
    both = Teachers(models, [1.0, 3.0], "lm").targets(batch, 2.0, fused=True)
    assert both.logits is not None and both.logits.shape == (3, 12, 61)
    with pytest.raises(ValueError, match="one weight per teacher"):
        Teachers(models, [1.0], "lm")


def test_teacher_cache_matches_the_teacher(tmp_path):
    torch.manual_seed(0)
    teachers = Teachers([Transformer(TransformerConfig(**TINY))], [1.0], "lm")
    split = lm_split(n=6)
    build = lambda: TopkTeacherCache.build(  # noqa: E731
        teachers,
        split,
        tmp_path,
        temperature=2.0,
        top_k=5,
        fingerprint="f",
        batch_size=4,
        device=torch.device("cpu"),
        progress=False,
    )
    cache = build()
    mtime = (tmp_path / "indices.npy").stat().st_mtime_ns
    batch = take(split, torch.tensor([5, 1]), torch.device("cpu"))
    indices, logprobs = cache.targets(batch, 2.0).topk
    expected = torch.log_softmax(teachers.targets(batch).logits / 2.0, -1).topk(5, -1)
    assert torch.equal(indices, expected.indices)
    assert_rel_close(logprobs, expected.values, 1e-6, "cached logprobs")
    build()
    assert (tmp_path / "indices.npy").stat().st_mtime_ns == mtime, "a matching cache must not be rebuilt"
    with pytest.raises(ValueError, match="temperature"):
        cache.targets(batch, 1.0)


# --- objective ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_objective_logit_term_is_the_distillation_loss(fused):
    torch.manual_seed(0)
    teacher_cfg, student_cfg = TransformerConfig(**TINY), TransformerConfig(**{**TINY, "n_layers": 1})
    teacher, student = Transformer(teacher_cfg), Transformer(student_cfg)
    config = LossConfig(temperature=Schedule(start=3, end=1), hard_weight=0.3, fused=fused)
    objective = DistillationObjective(config, "lm", student_cfg, teacher_cfg)
    batch = lm_split(n=2)
    targets = Teachers([teacher], [1.0], "lm").targets(batch, 2.0, fused=fused)
    loss, terms = objective(student, student(batch["input_ids"]), batch, targets, progress=0.5)
    expected = reference_distillation_loss(
        student.logits(student(batch["input_ids"]).hidden).double(),
        targets.full_logits().double(),
        batch["labels"],
        temperature=2.0,
        hard_weight=0.3,
    )
    assert_rel_close(loss, expected, 1e-5, "objective")
    assert set(terms) == {"logit"}


def test_objective_hidden_and_attention_terms():
    torch.manual_seed(0)
    teacher_cfg = TransformerConfig(**TINY)
    student_cfg = TransformerConfig(**{**TINY, "d_model": 16, "n_layers": 1})
    teacher, student = Transformer(teacher_cfg), Transformer(student_cfg)
    config = LossConfig(hidden_weight=1.0, attention_weight=1.0, attention_relations=["qk", "vv"], relation_heads=4)
    objective = DistillationObjective(config, "lm", student_cfg, teacher_cfg)
    assert objective.hidden_map == [(0, 0), (1, 2)] and objective.attention_map == [(0, 1)]
    assert objective.projection.weight.shape == (32, 16)
    batch = lm_split(n=2)
    targets = Teachers([teacher], [1.0], "lm").targets(batch, 2.0, fused=True, hidden_states=True, qkv=True)
    out = student(batch["input_ids"], output_hidden_states=True, output_qkv=True)
    loss, terms = objective(student, out, batch, targets, progress=0.0)
    assert set(terms) == {"logit", "hidden", "attention"}
    assert torch.isclose(loss, sum(terms.values()), rtol=1e-5)
    loss.backward()
    assert objective.projection.weight.grad.abs().sum() > 0
    expected_hidden = torch.stack(
        [F.mse_loss(objective.projection(out.hidden_states[s]), targets.hidden_states[t]) for s, t in [(0, 0), (1, 2)]]
    ).mean()
    assert torch.isclose(terms["hidden"], expected_hidden, rtol=1e-5)


def test_objective_bad_layer_map():
    cfg = TransformerConfig(**TINY)
    with pytest.raises(ValueError, match="hidden_layer_map"):
        DistillationObjective(LossConfig(hidden_weight=1.0, hidden_layer_map=[(0, 5)]), "lm", cfg, cfg)


def test_objective_without_teacher_is_cross_entropy():
    torch.manual_seed(0)
    cfg = TransformerConfig(**TINY)
    model, batch = Transformer(cfg), lm_split(n=2)
    loss, terms = DistillationObjective(LossConfig(), "lm", cfg, None)(
        model, model(batch["input_ids"]), batch, None, 0.0
    )
    logits = model.logits(model(batch["input_ids"]).hidden)
    assert torch.isclose(loss, F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    assert set(terms) == {"ce"}


# --- adversarial ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_adversarial_delta_stays_in_the_ball_and_increases_the_loss(steps):
    target = torch.randn(2, 5, 8)
    embeds = torch.randn(2, 5, 8)
    loss_fn = lambda e: (e - target).pow(2).sum()  # noqa: E731
    delta = adversarial_delta(loss_fn, embeds, epsilon=0.5, steps=steps)
    radius = 0.5 * embeds.norm(dim=-1)  # epsilon is relative to each token embedding's norm
    assert delta.shape == embeds.shape and not delta.requires_grad
    assert (delta.norm(dim=-1) <= radius * (1 + 1e-6)).all()
    assert loss_fn(embeds + delta) > loss_fn(embeds)
    if steps == 1:  # FGM: the radius along the per-token gradient direction (e - target)
        direction = F.normalize(embeds - target, dim=-1)
        assert_rel_close(delta, radius[..., None] * direction, 1e-5, "fgm")


# --- metrics ------------------------------------------------------------------------------------------------


def test_macro_f1():
    predicted, target = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: 1
    assert math.isclose(macro_f1(predicted, target), (2 / 3 + 2 / 3 + 1) / 3)


def test_throughput_warms_up_times_in_turn_and_keeps_each_batch_fastest(monkeypatch):
    """One untimed warm-up batch per model, then rounds of every batch of every model in turn; a model's time is
    the sum over batches of each batch's fastest time (here 1 + 2 = 3 s for a: not its best round, 5 s)."""
    clock, calls = [0.0], []
    monkeypatch.setattr("tsa_fast.distill.evaluate.time", SimpleNamespace(perf_counter=lambda: clock[0]))
    models = {"a": torch.nn.Linear(1, 1), "b": torch.nn.Linear(1, 1)}
    names = {id(model): name for name, model in models.items()}
    seconds = iter([9, 9, 1, 5, 2, 2, 3, 2, 4, 4])  # in call order: warm-up a, b; round 1: a, b; round 2: a, b

    def forward(model, batch):
        calls.append((names[id(model)], batch))
        clock[0] += next(seconds)

    speeds = throughput(models, [0, 1], forward, 12, repeats=2, device=torch.device("cpu"))
    assert calls == [("a", 0), ("b", 0), *[(name, batch) for _ in range(2) for name in "ab" for batch in (0, 1)]]
    assert speeds == {"a": 12 / 3, "b": 12 / 4}
    assert not any(model.training for model in models.values())


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, None, tensorboard=False)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 30, "val_perplexity": 9.5})
    resumed = MetricsLog(path, 20, tensorboard=False)
    resumed.write({"step": 30, "loss": 0.5})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == ["10", "20", "30"] and rows[-1]["loss"] == "0.5"


# --- training loop --------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """grad_accum=2 with batch 2 takes the same examples as batch 4 in one micro-batch, and the same step."""
    data = type("Data", (), {"task": "lm", "train": lm_split(n=16), "validation": lm_split(n=4)})()
    cfg = TransformerConfig(**TINY)
    params = []
    for batch_size, accum in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        training = TrainingConfig(steps=2, batch_size=batch_size, grad_accum=accum, warmup_steps=0)
        phase = Phase(
            "p", tmp_path, training, 0, torch.device("cpu"), logging=LoggingConfig(progress=False, tensorboard=False)
        )
        distiller = Distiller(model, DistillationObjective(LossConfig(), "lm", cfg, None), data, phase)
        distiller.train_step()
        distiller.train_step()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert_rel_close(params[1], params[0], 1e-5, "parameters after two steps")


@pytest.mark.parametrize("teacher", [None, "fused", "unfused"])
def test_gradient_accumulation_over_uneven_micro_batches_equals_the_big_batch(teacher, tmp_path):
    """Micro-batches counting different numbers of labels (most of some rows ignore_index, as chat masking and
    on-policy continuations make them): grad_accum=2 gives the step of the one big batch, the token mean over
    the whole step (the objective's num_items), not the mean of the micro-batches' means."""
    torch.manual_seed(0)
    split = lm_split(n=8)
    keep = torch.tensor([12, 1, 2, 12, 3, 12, 1, 5])  # labels counted per example
    split["labels"][torch.arange(12) >= keep[:, None]] = -100
    data = type("Data", (), {"task": "lm", "train": split, "validation": lm_split(n=4)})()
    cfg = TransformerConfig(**TINY)
    teachers = None if teacher is None else Teachers([Transformer(TransformerConfig(**TINY))], [1.0], "lm")
    config = LossConfig(hard_weight=0.5, fused=teacher == "fused")
    params, losses = [], []
    for batch_size, accum in ((4, 1), (2, 2)):
        torch.manual_seed(1)
        model = Transformer(cfg)
        training = TrainingConfig(steps=2, batch_size=batch_size, grad_accum=accum, warmup_steps=0)
        phase = Phase(
            "p", tmp_path, training, 0, torch.device("cpu"), logging=LoggingConfig(progress=False, tensorboard=False)
        )
        objective = DistillationObjective(config, "lm", cfg, None if teachers is None else cfg)
        distiller = Distiller(model, objective, data, phase, teachers)
        losses.append([distiller.step_values(*distiller.train_step())[0] for _ in range(2)])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # The steps' micro-batches count 15 and 17, then 14 and 2 labels: their means' mean is not the big batch's.
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert_rel_close(params[1], params[0], 1e-5, "parameters after two steps")
