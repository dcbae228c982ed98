"""The Hugging Face causal-LM recipe (`tsa_fast.recipes.hf_lm`), offline: tiny random Llama and Qwen2 models and a
tiny BPE tokenizer with a chat template are saved to temp directories, and the recipe runs from them as a user
would (in process, and `python train.py --config ...` in a subprocess): text and chat data (assistant-only
labels), a teacher embedding padded past the tokenizer, a depth-pruned student, on-policy distillation and
sequence-level KD (chat prompts: the tokens before the assistant turn, left-padded for generation); the exported
students load with `AutoModelForCausalLM.from_pretrained` and generate; every bad input is a ValueError before
training."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_lm = pytest.importorskip("tsa_fast.recipes.hf_lm")  # skips where transformers is missing or too old

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from tsa_fast.distill.config import OnPolicyConfig  # noqa: E402
from tsa_fast.distill.evaluate import IGNORE_INDEX, evaluate  # noqa: E402
from tsa_fast.distill.on_policy import PROMPT_LENGTHS, is_on_policy, on_policy_batch  # noqa: E402
from tsa_fast.distill.teachers import Teachers  # noqa: E402
from tsa_fast.integrations.hf import HFModel, layer_subset_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the cat sat on a mat while dogs ran over green hills and birds sang songs of old".split()


def sentences(n: int, seed: int = 0, words: int = 12) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (words,), generator=generator)) for _ in range(n)]


def tiny_tokenizer(vocab_size: int = 300, extra: str = "") -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of about vocab_size tokens with Qwen-style chat markers and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences(200) + [extra], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def save_model(directory: Path, arch: str, tokenizer, *, vocab_size: int | None = None, layers: int = 4, **options):
    """A random `arch` (llama, qwen2) causal LM of `layers` blocks, hidden 32, saved with the tokenizer."""
    shape = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **options,
    )
    config = transformers.LlamaConfig(**shape) if arch == "llama" else transformers.Qwen2Config(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def write_text(path: Path, n: int = 60) -> Path:
    path.write_text("\n\n".join(sentences(n, seed=1)))
    return path


def write_chat(path: Path, n: int = 30) -> Path:
    texts = sentences(2 * n, seed=2, words=4)
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": texts[2 * i]},
                {"role": "assistant", "content": texts[2 * i + 1]},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def options(tmp_path: Path, teacher: Path, source: Path, **extra) -> dict:
    values = {
        "teacher": {"pretrained": str(teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"source": str(source), "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "training": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 4, "log_every": 2},
        "logging": {"tensorboard": False, "progress": False},
    }
    for key, value in extra.items():  # sections are updated, except the student, which is replaced
        merge = isinstance(value, dict) and key in values and key != "student"
        values[key] = {**values[key], **value} if merge else value
    return values


def config_of(tmp_path, teacher, source, **extra):
    return hf_lm.HFLMConfig.model_validate(options(tmp_path, teacher, source, **extra))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen_teacher(tmp_path_factory, tokenizer):
    """A Qwen2-style teacher whose embedding is padded to a multiple of 64 past the tokenizer (as Qwen's)."""
    padded = -(-len(tokenizer) // 64) * 64
    assert padded > len(tokenizer)
    return save_model(tmp_path_factory.mktemp("qwen"), "qwen2", tokenizer, vocab_size=padded, tie_word_embeddings=True)


# --- chat rendering ------------------------------------------------------------------------------------------


def test_chat_labels_are_the_assistant_tokens(tokenizer, tmp_path):
    """Labels are the next tokens exactly where those are the assistant turn (content and <|im_end|>\\n), the
    system and user tokens and the generation prompt ignore_index, and the rows decode to the rendered text."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on a mat"},
        {"role": "user", "content": "dogs ran"},
        {"role": "assistant", "content": "over green hills"},
    ]
    rows = hf_lm.chat_rows(tokenizer, [hf_lm.Conversation(messages, "0")], 128, tokenizer.pad_token_id, "test")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    n = len(ids) - 1
    assert rows["attention_mask"][0].sum() == n and rows["input_ids"][0, :n].tolist() == ids[:-1]
    labels = rows["labels"][0]
    assert (labels[n:] == IGNORE_INDEX).all()
    targets = [tokenizer.decode([t]) for t in labels[:n].tolist() if t != IGNORE_INDEX]
    assert "".join(targets) == "on a mat<|im_end|>\nover green hills<|im_end|>\n"
    # Every kept label is the next input token.
    kept = labels[: n - 1] != IGNORE_INDEX
    assert (labels[: n - 1][kept] == rows["input_ids"][0, 1:n][kept]).all()
    # The prompt: every token before the first assistant turn's content (the generation prompt included).
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert rows[PROMPT_LENGTHS].tolist() == [len(tokenizer(prompt, add_special_tokens=False).input_ids)]


def test_jsonl_text_and_saved_datasets(tmp_path, tokenizer, qwen_teacher):
    """A .jsonl text file (data.text_field), a saved Dataset of text and a saved DatasetDict of chats (its own
    splits kept) all build: text as full next-token blocks, chats one conversation a row."""
    datasets = pytest.importorskip("datasets")
    texts = sentences(60, seed=3)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": text}) for text in texts))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "text_ds"))
    rows = [json.loads(line) for line in write_chat(tmp_path / "chat.jsonl", 12).read_text().splitlines()]
    splits = {"train": rows[:8], "validation": rows[8:10], "test": rows[10:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "chat_ds")
    )
    jsonl = hf_lm.prepare_inputs(
        config_of(tmp_path, qwen_teacher, tmp_path / "docs.jsonl", data={"text_field": "body"})
    )
    saved = hf_lm.prepare_inputs(config_of(tmp_path, qwen_teacher, tmp_path / "text_ds")).data
    assert torch.equal(jsonl.data.train["input_ids"], saved.train["input_ids"])
    assert torch.equal(saved.train["labels"][:, :-1], saved.train["input_ids"][:, 1:])
    chats = hf_lm.prepare_inputs(
        config_of(tmp_path, qwen_teacher, tmp_path / "chat_ds", data={"format": "chat", "seq_len": 64})
    ).data
    assert chats.num_documents == {"train": 8, "validation": 2, "test": 2}
    assert chats.train["attention_mask"].shape == (8, 64)


def test_tokenized_data_is_cached(tmp_path, tokenizer, qwen_teacher, monkeypatch):
    """A second prepare with the same source, options and tokenizer loads the tensors from data.cache_dir; a changed
    option or a changed file is tokenized anew."""
    source = write_chat(tmp_path / "chat.jsonl")
    config = config_of(tmp_path, qwen_teacher, source, data={"format": "chat", "seq_len": 64})
    first = hf_lm.prepare_inputs(config).data
    assert len(list((tmp_path / "cache" / "hf_lm").glob("data-*.pt"))) == 1

    def fail(*args):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(hf_lm, "assistant_token_mask", fail)
        second = hf_lm.prepare_inputs(config).data
    for name in ("train", "validation", "test"):
        for key, tensor in first.split(name).items():
            assert torch.equal(second.split(name)[key], tensor)
    assert second.num_documents == first.num_documents
    shorter = config_of(tmp_path, qwen_teacher, source, data={"format": "chat", "seq_len": 48})
    assert hf_lm.prepare_inputs(shorter).data.train["input_ids"].shape[1] == 48
    write_chat(source, 40)
    assert sum(hf_lm.prepare_inputs(config).data.num_documents.values()) == 40


def test_chat_template_that_rewrites_earlier_turns_is_an_error(tokenizer):
    """A template that elides every assistant turn but the last (as templates that drop past reasoning do) is not
    prefix-stable: the assistant spans cannot be located, a ValueError naming the conversation."""
    eliding = copy.copy(tokenizer)
    eliding.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on"},
        {"role": "user", "content": "a mat"},
        {"role": "assistant", "content": "dogs ran"},
    ]
    with pytest.raises(ValueError, match=r"chats conversation 0: the chat template does not render .* messages\[:2\]"):
        hf_lm.chat_rows(eliding, [hf_lm.Conversation(messages, "0")], 64, 0, "chats")


def test_the_padding_is_never_generated(tokenizer):
    """A model that puts its mass on the padding rows of its head: it still generates only tokens of the shared
    vocabulary (greedy and sampled), never one the tokenizer cannot decode."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + 20,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] *= 1000
    prompt = torch.tensor([[5, 6, 7]])
    unrestricted = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert (unrestricted[:, 3:] >= len(tokenizer)).any()  # the model itself would generate padding
    lm = hf_lm.SharedVocabularyLM(model, len(tokenizer))
    assert lm.logits(torch.randn(3, 32)).shape == (3, len(tokenizer))
    for temperature in (0.0, 1.0):
        out = lm.generate(prompt, 4, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, 7) and (out[:, 3:] < len(tokenizer)).all()


def test_torch_dtype(tmp_path, tokenizer, qwen_teacher):
    """torch_dtype=bfloat16: the teacher and every kind of student are loaded or built in bfloat16."""
    source = write_text(tmp_path / "t.txt")
    student_dir = save_model(tmp_path / "student", "qwen2", tokenizer, layers=2)
    for student in (
        {"from_teacher": {"layers": 2}},
        {"config": {"num_hidden_layers": 1}},
        {"pretrained": str(student_dir)},
    ):
        config = config_of(tmp_path, qwen_teacher, source, torch_dtype="bfloat16", student=student)
        prepared = hf_lm.prepare_inputs(config)
        teacher = hf_lm.load_causal_lm(prepared.teacher_dir, torch.bfloat16, "teacher.pretrained")
        model = hf_lm.build_student(config, prepared, teacher)
        assert teacher.dtype == model.dtype == torch.bfloat16
        assert model.config.num_hidden_layers == (1 if "config" in student else 2)


def test_chat_without_assistant_turn_is_an_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the conversation has no assistant turn"):
        hf_lm.read_conversations(path)


# --- on-policy and sequence-level KD ----------------------------------------------------------------------------


def padding_loving_lm(arch: str, tokenizer, padding: int = 20) -> hf_lm.SharedVocabularyLM:
    """A random `arch` causal LM whose head puts its mass on the `padding` rows past the tokenizer."""
    shape = dict(
        vocab_size=len(tokenizer) + padding,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**shape) if arch == "llama" else transformers.Qwen2Config(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] *= 1000
    return hf_lm.SharedVocabularyLM(model, len(tokenizer))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_on_policy_batch_of_chat_prompts(tmp_path, tokenizer, arch):
    """Chat rows: each prompt is the row's tokens before the assistant turn (different lengths, left-padded for
    generation); the batch's row i is its prompt then its continuation, right-padded with an attention mask; the
    labels are the generated tokens only, up to and including the first EOS; greedy continuations are each
    prompt's alone; the model scores a padded row as the row alone; the padding is never sampled."""
    lm = padding_loving_lm(arch, tokenizer)
    conversations = hf_lm.read_conversations(write_chat(tmp_path / "chat.jsonl", 6))
    batch = hf_lm.chat_rows(tokenizer, conversations, 64, tokenizer.pad_token_id, "chats")
    lengths = batch[PROMPT_LENGTHS]
    assert len(set(lengths.tolist())) > 1  # prompts of different lengths
    new = 6
    config = OnPolicyConfig(fraction=1.0, max_new_tokens=new, sample_temperature=1.0)
    sampled = on_policy_batch(lm, batch, config, generator=torch.Generator().manual_seed(0))
    assert sampled["input_ids"].shape == (6, int(lengths.max()) + new) and sampled["on_policy"]
    assert (sampled["input_ids"][sampled["attention_mask"]] < len(tokenizer)).all()  # never the padding
    unrestricted = lm.model.generate(batch["input_ids"][:1, : int(lengths[0])], max_new_tokens=4, do_sample=False)
    assert (unrestricted[:, int(lengths[0]) :] >= len(tokenizer)).any()  # which the model itself would generate

    # The EOS: the token row 0 sampled third; the same generator draws the same tokens.
    eos = int(sampled["input_ids"][0, int(lengths[0]) + 2])
    out = on_policy_batch(lm, batch, config, generator=torch.Generator().manual_seed(0), eos_id=eos)
    assert torch.equal(out["input_ids"], sampled["input_ids"])
    for i, p in enumerate(lengths.tolist()):
        row, labels = out["input_ids"][i], out["labels"][i]
        assert torch.equal(row[:p], batch["input_ids"][i, :p])
        assert out["attention_mask"][i].tolist() == [True] * (p + new) + [False] * (len(row) - p - new)
        generated = row[p : p + new].tolist()
        stop = generated.index(eos) + 1 if eos in generated else new
        expected = [IGNORE_INDEX] * (p - 1) + generated[:stop] + [IGNORE_INDEX] * (len(row) - p + 1 - stop)
        assert labels.tolist() == expected
    assert (out["labels"][0] != IGNORE_INDEX).sum() == 3

    greedy = on_policy_batch(lm, batch, config.model_copy(update={"sample_temperature": 0.0}), generator=None)
    lm.eval()
    with torch.no_grad():
        padded = lm(greedy["input_ids"], greedy["attention_mask"]).hidden
        for i, p in enumerate(lengths.tolist()):
            alone = lm.generate(batch["input_ids"][i : i + 1, :p], new, temperature=0.0)
            assert torch.equal(greedy["input_ids"][i, : p + new], alone[0])
            hidden = lm(alone).hidden[0]
            torch.testing.assert_close(padded[i, : p + new], hidden, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="max_new_tokens must be given for prompts of different lengths"):
        on_policy_batch(lm, batch, OnPolicyConfig(fraction=1.0), generator=None)


def test_text_on_policy_generates_within_the_shared_vocabulary(tokenizer):
    """Text blocks: the prompt is the first prompt_tokens of every row, the continuation the rest of the block,
    sampled from the shared vocabulary only."""
    lm = padding_loving_lm("qwen2", tokenizer)
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(len(tokenizer), (3, 12)), "labels": torch.zeros(3, 12, dtype=torch.int64)}
    out = on_policy_batch(lm, batch, OnPolicyConfig(fraction=1.0, prompt_tokens=4), generator=torch.Generator())
    assert out["input_ids"].shape == (3, 12) and "attention_mask" not in out
    assert torch.equal(out["input_ids"][:, :4], batch["input_ids"][:, :4])
    assert (out["input_ids"] < len(tokenizer)).all()
    assert (out["labels"][:, :3] == IGNORE_INDEX).all() and torch.equal(out["labels"][:, 3:-1], out["input_ids"][:, 4:])


def spy_on_policy(monkeypatch) -> list:
    """Record (micro-batch number, batch, result) of every `Distiller.maybe_on_policy` call."""
    calls = []
    original = hf_lm.Distiller.maybe_on_policy

    def recorded(self, batch, micro_batch):
        out = original(self, batch, micro_batch)
        calls.append((micro_batch, batch, out))
        return out

    monkeypatch.setattr(hf_lm.Distiller, "maybe_on_policy", recorded)
    return calls


@pytest.mark.parametrize(("data_format", "fraction"), [("text", 1.0), ("chat", 0.5)])
def test_on_policy_run(tmp_path, tokenizer, qwen_teacher, monkeypatch, data_format, fraction):
    """An hf_lm run with loss.on_policy from model directories (a Qwen2 teacher padded past the tokenizer, a pruned
    student): the micro-batches that `is_on_policy` draws are the student's continuations of their prompts (text:
    the first prompt_tokens; chat: the tokens before the assistant turn), labels on the generated tokens only,
    never a padding token; the others are the data's batches; the run completes."""
    calls = spy_on_policy(monkeypatch)
    chat = data_format == "chat"
    source = write_chat(tmp_path / "chat.jsonl") if chat else write_text(tmp_path / "text.txt")
    on_policy = {"fraction": fraction, "prompt_tokens": 8, "sample_temperature": 1.0}
    config = config_of(
        tmp_path,
        qwen_teacher,
        source,
        data={"format": data_format, "seq_len": 64 if chat else 32},
        loss={"divergence": "reverse_kl", "on_policy": on_policy},
        baseline=False,
    )
    prepared = hf_lm.prepare_inputs(config)
    new = prepared.loss.on_policy.max_new_tokens
    longest = int(prepared.data.train[PROMPT_LENGTHS].max()) if chat else 8
    assert new == config.data.seq_len - longest  # the rest of the sequence after the longest prompt
    results = hf_lm.run(config, prepared=prepared)
    assert set(results) == {"teacher", "distilled"} and results["distilled"]["validation_perplexity"] > 1
    assert [m for m, _, _ in calls] == list(range(config.training.steps))
    drawn = [is_on_policy(fraction, config.seed, m) for m, _, _ in calls]
    assert [bool(out.get("on_policy")) for _, _, out in calls] == drawn
    assert any(drawn) and (fraction == 1.0 or not all(drawn))
    for (_, batch, out), on in zip(calls, drawn):
        if not on:
            assert out is batch
            continue
        lengths = batch[PROMPT_LENGTHS].tolist() if chat else [8] * len(batch["input_ids"])
        assert out["input_ids"].shape[1] == max(lengths) + new  # the same steps in every batch (and rank)
        for i, p in enumerate(lengths):
            row, labels = out["input_ids"][i], out["labels"][i]
            assert torch.equal(row[:p], batch["input_ids"][i, :p])
            counted = (labels != IGNORE_INDEX).nonzero().flatten()
            assert len(counted) > 0 and counted.min() >= p - 1 and counted.max() < p - 1 + new
            assert torch.equal(labels[counted], row[counted + 1])
            assert (row[: p + new] < prepared.vocab_size).all()
            if chat:
                assert out["attention_mask"][i].sum() == p + new


@pytest.mark.parametrize("data_format", ["text", "chat"])
def test_sequence_kd_run(tmp_path, tokenizer, qwen_teacher, monkeypatch, data_format):
    """loss.sequence_kd: the training split is the teacher's greedy completions of the training prompts (text: the
    first prompt_tokens of a block; chat: the tokens before the assistant turn), labels on the completion only,
    cached (a second build generates nothing); the run completes."""
    chat = data_format == "chat"
    source = write_chat(tmp_path / "chat.jsonl", 12) if chat else write_text(tmp_path / "text.txt", 30)
    config = config_of(
        tmp_path,
        qwen_teacher,
        source,
        data={"format": data_format, "seq_len": 64 if chat else 32},
        loss={"sequence_kd": {"enabled": True, "prompt_tokens": 8}},
        training={"steps": 2},
        baseline=False,
    )
    prepared = hf_lm.prepare_inputs(config)
    teacher_model = hf_lm.load_causal_lm(prepared.teacher_dir, torch.float32, "teacher.pretrained")
    teacher = hf_lm.SharedVocabularyLM(teacher_model, prepared.vocab_size)
    train = hf_lm.sequence_kd_train(config, prepared, teacher, torch.device("cpu"))
    data = prepared.data.train
    lengths = data[PROMPT_LENGTHS].tolist() if chat else [8] * len(data["input_ids"])
    new = prepared.loss.sequence_kd.max_new_tokens
    assert len(train["input_ids"]) == len(data["input_ids"])
    for i in (0, len(lengths) - 1):
        p = lengths[i]
        row = train["input_ids"][i]
        alone = teacher.generate(data["input_ids"][i : i + 1, :p], new, temperature=0.0)[0]
        assert torch.equal(row[: p + new], alone)
        counted = (train["labels"][i] != IGNORE_INDEX).nonzero().flatten()
        assert counted.min() >= p - 1 and counted.max() < p - 1 + new
        if chat:
            assert train["attention_mask"][i].sum() == p + new

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    with monkeypatch.context() as patch:
        patch.setattr(hf_lm.SharedVocabularyLM, "generate", fail)
        again = hf_lm.sequence_kd_train(config, prepared, teacher, torch.device("cpu"))
    assert torch.equal(again["input_ids"], train["input_ids"]) and torch.equal(again["labels"], train["labels"])
    results = hf_lm.run(config, prepared=prepared)
    assert set(results) == {"teacher", "distilled"} and results["distilled"]["validation_perplexity"] > 1


# --- runs ----------------------------------------------------------------------------------------------------


def test_chat_run_padded_vocabularies(tmp_path, tokenizer, qwen_teacher):
    """Chat data, a Qwen2 teacher whose embedding is padded past the tokenizer and a pretrained Qwen2 student whose
    is not: the models compare on the shared first K tokens; every model is evaluated on assistant tokens only;
    the students are saved as HF directories that load and generate."""
    student_dir = save_model(tmp_path / "student", "qwen2", tokenizer, layers=2, tie_word_embeddings=True)
    data = write_chat(tmp_path / "chat.jsonl")
    config = config_of(
        tmp_path, qwen_teacher, data, data={"format": "chat", "seq_len": 64}, student={"pretrained": str(student_dir)}
    )
    prepared = hf_lm.prepare_inputs(config)
    assert prepared.vocab_size == len(tokenizer) < transformers.AutoConfig.from_pretrained(qwen_teacher).vocab_size
    labels = prepared.data.train["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    results = hf_lm.run(config, prepared=prepared)
    assert set(results) == {"teacher", "distilled", "baseline"}
    for row in results.values():
        assert row["validation_perplexity"] > 1 and row["inference_tokens_per_s"] > 0
    assert results["teacher"]["parameters"] > results["distilled"]["parameters"]
    assert 0 <= results["baseline"]["validation_agreement"] <= 1 and results["distilled"]["validation_kl"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert "| distilled |" in (tmp_path / "run" / "results.md").read_text()
    exported = tmp_path / "run" / "distilled" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer)
    loaded = transformers.AutoTokenizer.from_pretrained(exported)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    text = loaded.apply_chat_template(
        [{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True
    )
    prompt = torch.tensor([loaded(text, add_special_tokens=False).input_ids])
    out = HFModel(model).generate(prompt, 5, temperature=0)
    assert out.shape == (1, prompt.shape[1] + 5) and (out[:, : prompt.shape[1]] == prompt).all()


def test_perplexity_counts_assistant_tokens_only(tmp_path, tokenizer, qwen_teacher):
    """The teacher's validation perplexity is exp of its mean NLL over the assistant labels, and a student's top-1
    agreement and KL to it their means over the same positions, computed by hand from the full models (the padding
    columns left out)."""
    config = config_of(
        tmp_path, qwen_teacher, write_chat(tmp_path / "chat.jsonl"), data={"format": "chat", "seq_len": 64}
    )
    prepared = hf_lm.prepare_inputs(config)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(qwen_teacher).eval()
    split = prepared.data.validation
    with torch.no_grad():
        logits = teacher(input_ids=split["input_ids"], attention_mask=split["attention_mask"].long()).logits
    logits = logits[..., : prepared.vocab_size].double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), split["labels"].flatten(), ignore_index=IGNORE_INDEX)
    metrics = evaluate(
        hf_lm.SharedVocabularyLM(teacher, prepared.vocab_size), split, "lm", batch_size=4, device=torch.device("cpu")
    )
    assert metrics["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)

    student = layer_subset_student(teacher, [1]).eval()
    with torch.no_grad():
        student_logits = student(input_ids=split["input_ids"], attention_mask=split["attention_mask"].long()).logits
    counted = split["labels"] != IGNORE_INDEX
    log_p_t = logits[counted].log_softmax(-1)
    log_p_s = student_logits[..., : prepared.vocab_size].double()[counted].log_softmax(-1)
    agreement = (log_p_t.argmax(-1) == log_p_s.argmax(-1)).double().mean()
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    teachers = Teachers([hf_lm.SharedVocabularyLM(teacher, prepared.vocab_size)], [1.0], "lm")
    metrics = evaluate(
        hf_lm.SharedVocabularyLM(student, prepared.vocab_size),
        split,
        "lm",
        batch_size=4,
        device=torch.device("cpu"),
        teachers=teachers,
    )
    assert metrics["agreement"] == pytest.approx(float(agreement), abs=1e-9)
    assert metrics["kl"] == pytest.approx(float(kl), rel=1e-4)


def test_distilled_student_moves_towards_the_teacher(tmp_path, tokenizer):
    """Text data, a Llama teacher and a fresh smaller student (student.config): after the same steps the
    distilled student is closer to the teacher (KL) than the baseline."""
    teacher = save_model(tmp_path / "llama", "llama", tokenizer)
    data = write_text(tmp_path / "text.txt", 120)
    config = config_of(
        tmp_path,
        teacher,
        data,
        student={"config": {"num_hidden_layers": 2}},
        training={"steps": 30, "lr": 3e-3, "eval_every": 30},
        loss={"hard_weight": 0.0},
    )
    results = hf_lm.run(config)
    assert results["distilled"]["validation_kl"] < results["baseline"]["validation_kl"]


def test_resume_loads_the_finished_students(tmp_path, tokenizer, qwen_teacher, monkeypatch):
    """`resume` after a finished run trains nothing: every student is its checkpoint, with the same validation."""
    config = config_of(tmp_path, qwen_teacher, write_text(tmp_path / "t.txt"), training={"steps": 2})
    first = hf_lm.prepare(config)()

    def no_training(self):
        raise AssertionError(f"{self.phase.name} trained again")

    monkeypatch.setattr(hf_lm.Distiller, "train_step", no_training)
    again = hf_lm.prepare(config)(resume=True)
    for name in ("distilled", "baseline"):
        assert again[name]["validation_perplexity"] == pytest.approx(first[name]["validation_perplexity"], rel=1e-6)
        assert again[name]["validation_kl"] == pytest.approx(first[name]["validation_kl"], rel=1e-6)


def test_train_py_end_to_end(tmp_path, tokenizer):
    """The user's path: a tiny Llama teacher and a YAML written to disk, `python train.py --config ... key=value`
    with a depth-pruned student (teacher blocks 0 and 3); then `python -m tsa_fast.generate` on the export."""
    teacher = save_model(tmp_path / "teacher", "llama", tokenizer)
    data = write_chat(tmp_path / "chat.jsonl")
    values = options(tmp_path, teacher, data, data={"format": "chat", "seq_len": 64})
    values["recipe"] = "hf_lm"
    import yaml

    config = tmp_path / "hf_lm.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config), "training.steps=2", "baseline=false"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results) == {"teacher", "distilled"}
    exported = tmp_path / "run" / "distilled" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    blocks = transformers.AutoModelForCausalLM.from_pretrained(teacher).model.layers
    for i, j in enumerate([0, 3]):  # the pruned student began as these teacher blocks: 2 steps moved them a little
        difference = model.model.layers[i].mlp.up_proj.weight - blocks[j].mlp.up_proj.weight
        assert difference.abs().max() < 0.05
    generate = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsa_fast.generate",
            str(tmp_path / "run" / "distilled" / "model"),
            "--prompt",
            "the cat",
        ]
        + ["--max-new-tokens", "4", "--temperature", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert generate.stdout.startswith("the cat")


# --- bad input -------------------------------------------------------------------------------------------------


def test_not_a_model_directory(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    config = config_of(tmp_path, tmp_path / "empty", write_text(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match=r"teacher.pretrained=.*empty.* is not a Hugging Face model directory"):
        hf_lm.prepare(config)


def test_tokenizer_that_is_not_the_teachers(tmp_path, tokenizer, qwen_teacher):
    other = tiny_tokenizer(320, extra="zebra quantum xylophone")
    other.save_pretrained(tmp_path / "other")
    config = config_of(tmp_path, qwen_teacher, write_text(tmp_path / "t.txt"), tokenizer=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=rf"\({len(other)} tokens\) is not the teacher's tokenizer \({len(tokenizer)}"):
        hf_lm.prepare(config)
    # Without a tokenizer of its own the teacher's vocabulary must still cover the tokenizer's.
    small = save_model(tmp_path / "small", "llama", None, vocab_size=len(tokenizer) - 10)
    config = config_of(tmp_path, small, write_text(tmp_path / "t.txt"), tokenizer=str(tmp_path / "other"))
    with pytest.raises(
        ValueError, match=rf"has {len(other)} tokens but the teacher's vocab_size is {len(tokenizer) - 10}"
    ):
        hf_lm.prepare(config)


def test_student_with_another_tokenizer(tmp_path, tokenizer, qwen_teacher):
    """A student directory with a tokenizer of another vocabulary is distilled across tokenizers (the run and its
    checks: tests/test_hf_lm_cross_tokenizer.py)."""
    other = tiny_tokenizer(320, extra="zebra quantum xylophone")
    student = save_model(tmp_path / "student", "qwen2", other, layers=2)
    config = config_of(tmp_path, qwen_teacher, write_text(tmp_path / "t.txt"), student={"pretrained": str(student)})
    prepared = hf_lm.prepare_inputs(config)
    assert prepared.cross_tokenizer and prepared.data.teacher_tokenizer is not None
    assert (len(prepared.tokenizer), len(prepared.teacher_tokenizer)) == (len(other), len(tokenizer))


def test_chat_data_without_assistant_turns(tmp_path, qwen_teacher):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "the cat"}]}) + "\n")
    config = config_of(tmp_path, qwen_teacher, path, data={"format": "chat", "seq_len": 64})
    with pytest.raises(ValueError, match="no assistant turn"):
        hf_lm.prepare(config)


def test_sequence_length_beyond_the_context(tmp_path, qwen_teacher):
    config = config_of(tmp_path, qwen_teacher, write_text(tmp_path / "t.txt"), data={"seq_len": 65})
    with pytest.raises(ValueError, match=r"data.seq_len=65 is beyond the models' context \(max_position_embeddings=64"):
        hf_lm.prepare(config)


@pytest.mark.parametrize("section", ["on_policy", "sequence_kd"])
def test_prompt_tokens_beyond_the_sequence(tmp_path, qwen_teacher, section):
    loss = {section: {"prompt_tokens": 32, **({"fraction": 1.0} if section == "on_policy" else {"enabled": True})}}
    with pytest.raises(ValueError, match=rf"loss.{section}.prompt_tokens=32 must be less than data.seq_len=32"):
        config_of(tmp_path, qwen_teacher, tmp_path / "t.txt", loss=loss)


def test_chat_prompt_beyond_the_context(tmp_path, qwen_teacher):
    """Chat data: the longest prompt plus loss.on_policy.max_new_tokens beyond the models' context (64), and a
    prompt that fills data.seq_len (nothing left to generate), are ValueErrors naming them, before training."""
    source = write_chat(tmp_path / "chat.jsonl")
    chat = {"format": "chat", "seq_len": 64}
    longest = int(
        hf_lm.prepare_inputs(config_of(tmp_path, qwen_teacher, source, data=chat)).data.train[PROMPT_LENGTHS].max()
    )
    loss = {"on_policy": {"fraction": 1.0, "max_new_tokens": 65 - longest}}
    with pytest.raises(
        ValueError,
        match=rf"longest chat prompt of the training split \({longest} tokens.* plus loss.on_policy.max_new_tokens="
        rf"{65 - longest} is longer than the models' context \(max_position_embeddings=64\)",
    ):
        hf_lm.prepare(config_of(tmp_path, qwen_teacher, source, data=chat, loss=loss))
    full = config_of(
        tmp_path,
        qwen_teacher,
        source,
        data={**chat, "seq_len": longest},
        loss={"sequence_kd": {"enabled": True}},
    )
    with pytest.raises(ValueError, match=rf"leaves no token to generate within data.seq_len={longest}"):
        hf_lm.prepare(full)


def test_student_needs_exactly_one_source(tmp_path, qwen_teacher):
    with pytest.raises(ValueError, match="exactly one of pretrained, from_teacher, config"):
        config_of(
            tmp_path,
            qwen_teacher,
            tmp_path / "t.txt",
            student={"config": {"num_hidden_layers": 1}, "from_teacher": {"layers": 1}},
        )


def test_example_config_loads():
    config = hf_lm.load_config(ROOT / "configs" / "hf_lm.yaml")
    assert config.recipe == "hf_lm" and config.student.from_teacher is not None


def test_student_config_with_an_unknown_attribute(tmp_path, qwen_teacher):
    config = config_of(tmp_path, qwen_teacher, write_text(tmp_path / "t.txt"), student={"config": {"n_layer": 1}})
    with pytest.raises(ValueError, match=r"student.config: \['n_layer'\] are not attributes of Qwen2Config"):
        hf_lm.prepare(config)
