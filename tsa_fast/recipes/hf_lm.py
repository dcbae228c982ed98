"""The Hugging Face causal-LM recipe (`recipe: hf_lm`, configs/hf_lm.yaml): a teacher and a student loaded from
local `AutoModelForCausalLM` directories (nothing is downloaded), distilled by the engine off-policy, on-policy
(`loss.on_policy`) or on the teacher's completions (`loss.sequence_kd`).

    python train.py --config configs/hf_lm.yaml teacher.pretrained=DIR data.source=chat.jsonl

1. Models: `teacher.pretrained` (a directory with config.json and weights), the student one of
   `student.pretrained` (another directory), `student.from_teacher.layers` (depth pruning: the teacher's
   embeddings, head and the listed blocks, `layer_subset_student`) or `student.config` (the teacher's config
   with these overrides, randomly initialized); both in `torch_dtype`. The tokenizer is the teacher's
   (`AutoTokenizer` from its directory) or `tokenizer`.
2. Data (`data.format`): `text`, a .txt file, a .jsonl file (`data.text_field`) or a saved dataset, read and
   split by `tsa_fast.distill.data` and cut into next-token blocks of `data.seq_len` (documents joined by the
   tokenizer's EOS); `chat`, a .jsonl file or saved dataset of `data.messages_field` conversations
   (`read_conversations`), each rendered with the tokenizer's chat template, right-padded, one per row, the
   labels of every token outside the assistant turns ignore_index (-100), so that every loss and metric
   counts the assistant tokens only, and `prompt_lengths`, the tokens before the first assistant token (the
   system and user turns and the generation prompt). The assistant spans are found by rendering
   incrementally: the text of messages[:i] with the generation prompt, then of messages[:i + 1], must be
   prefixes of the whole conversation's text, and assistant turn i is the text between them (its content and
   the template's end-of-turn marker; the generation prompt itself is not a target). This needs no
   `{% generation %}` marks in the template; a template that rewrites earlier turns (one that drops past
   reasoning) fails this check with a ValueError. Tokens belong to the span their first character is in
   (offsets of a fast tokenizer). The tokenized splits are cached under `data.cache_dir` by a fingerprint of
   the source files, the data options and the tokenizer.
3. Vocabularies: the models' distributions are over the first K = min(teacher, student vocab_size) tokens,
   which must cover the tokenizer (an embedding matrix padded past the tokenizer, as 151,936 vs 152,064 in one
   family, is fine: what the distillation ops do with `vocab_size=K`, here done by `SharedVocabularyLM` so that
   the losses, the evaluation and the agreement all see the same K columns); every label is checked to be
   below K. A student directory with a tokenizer of another vocabulary than the teacher's is a ValueError
   naming both sizes (no cross-tokenizer distillation).
4. Students, each for `training.steps` from the same initialization: `distilled` (the objective of `loss`, the
   engine's `LossConfig`: forward / reverse KL, JSD ... through fused_linear_distillation_loss on the hidden
   states and the LM-head weight, plus hard-label CE and the optional hidden-state and attention terms),
   `distilled_no_adversarial` (with adversarial training and `adversarial.compare`), and `baseline` (no
   teacher, CE only, on the data's tokens; with `baseline`). Each student is saved with `save_pretrained` and
   the tokenizer to `output_dir/PHASE/model/` (`AutoModelForCausalLM.from_pretrained` and
   `python -m tsa_fast.generate` load it).
   - `loss.on_policy` (GKD): a share `fraction` of the micro-batches are the student's own continuations
     (sampled without gradient at `sample_temperature`, through the model's `generate`, never a token of the
     embedding's padding) of the batch's prompts: text, the first `prompt_tokens` of each block; chat, each
     conversation's tokens before its first assistant token (`prompt_tokens` does not apply), left-padded to
     the longest with an attention mask for generation. The batch starts every row with its prompt, then its
     `max_new_tokens` generated tokens, right-padded with an attention mask (so a causal model scores each row
     as alone), labels on the generated tokens up to and including the first EOS; the teacher scores it in
     one forward and the divergence (reverse_kl, jsd with beta, ...) applies there only.
   - `loss.sequence_kd` (Kim and Rush): the distilled students train on the teacher's completions of the
     training prompts (the same prompts; at `temperature`, 0: greedy), generated once and cached under
     `loss.sequence_kd.dir` (null: data.cache_dir/hf_lm/sequence_kd/) by a fingerprint of the teacher's
     files, dtype and vocabulary, the training tensors and the sampling settings (resumable).
   `max_new_tokens` (null) is the rest of data.seq_len after the prompt (chat: after the training split's
   longest prompt), one number for the whole run: generation never stops early, so every data-parallel rank
   runs the same decoding steps.
5. Evaluation as the lm recipe's (`tsa_fast.recipes.lm.evaluate_all`, `write_report`): validation and test
   perplexity, top-1 agreement and KL to the teacher, tokens/s, for the teacher and every student, printed
   and written to output_dir as results.md, results.json and curves.png.

Every check (directories, tokenizer, vocabularies, sequence length against max_position_embeddings, the data, a
prompt plus its continuation against max_position_embeddings) runs in `prepare`, before any training; text
prompt_tokens below data.seq_len is checked when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tsa_fast.distill.checkpoints import load_weights_only, save_atomically
from tsa_fast.distill.config import AdversarialConfig, LossConfig, Section, TrainingConfig
from tsa_fast.distill.data import (
    SPLITS,
    Conversation,
    DataConfig,
    TaskData,
    lm_blocks,
    load_splits,
    random_rows,
    read_conversations,
    split_documents,
)
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.evaluate import IGNORE_INDEX
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.on_policy import PROMPT_LENGTHS
from tsa_fast.distill.sequence_kd import sequence_kd_split, teacher_completions
from tsa_fast.distill.teachers import Teachers
from tsa_fast.integrations.hf import HFModel, layer_subset_student
from tsa_fast.recipes.config import RunConfig, read_recipe
from tsa_fast.recipes.fingerprint import data_fingerprint, fingerprint
from tsa_fast.recipes.lm import SamplesConfig, evaluate_all, write_report
from tsa_fast.recipes.report import console
from tsa_fast.recipes.runtime import start_run

DATA_VERSION = 2  # bump when the tokenization rules change: part of the data cache's key
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ----------------------------------------------------------------------------------------------------------
# Config


class HFTeacherConfig(Section):
    pretrained: str = Field(description="a local AutoModelForCausalLM directory (config.json and weights)")


class FromTeacher(Section):
    layers: int | list[int] = Field(
        description="teacher blocks the student keeps, in order; an int n: n blocks spread evenly (every_kth_layer)"
    )


class HFStudentConfig(Section):
    """Exactly one of the three: a model directory, a depth-pruned teacher, or overrides of the teacher's config."""

    pretrained: str | None = Field(None, description="a local AutoModelForCausalLM directory")
    from_teacher: FromTeacher | None = Field(
        None, description="depth pruning: the teacher's embeddings, final norm, head and these blocks"
    )
    config: dict[str, Any] | None = Field(
        None, description="the teacher's config with these attributes changed (e.g. num_hidden_layers), random init"
    )

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("pretrained", "from_teacher", "config") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"student needs exactly one of pretrained, from_teacher, config; got {given or 'none'}")
        return self


class HFDataConfig(Section):
    source: str = Field(
        description="a .txt file (documents separated by blank lines), a .jsonl file, or a directory saved by "
        "datasets' save_to_disk (a Dataset, or a DatasetDict with train, validation and test)"
    )
    format: Literal["text", "chat"] = Field(
        "text", description="text: next-token blocks of documents; chat: one conversation a row, assistant loss only"
    )
    seq_len: int = Field(256, ge=2, description="text: tokens per block; chat: max tokens per conversation")
    text_field: str = Field("text", description="text: the field of a .jsonl record or dataset row")
    messages_field: str = Field("messages", description="chat: the field holding the list of {role, content}")
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1),
        description="train/validation/test fractions, by document or conversation (not for a "
        "saved DatasetDict, whose splits are used)",
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="keep this many training rows (blocks or conversations; a fixed random subset)"
    )
    cache_dir: str = Field(".cache/tsa_fast", description="where the tokenized splits are cached (by fingerprint)")


class HFLMConfig(RunConfig):
    """The recipe: teacher and student directories, tokenizer, dtype, data, losses, training, results (every option
    of configs/hf_lm.yaml)."""

    RECIPE = "hf_lm"
    DEFAULTS = {
        "name": "hf_lm",
        "output_dir": "runs/hf_lm",
        "training": TrainingConfig(steps=200, batch_size=8, lr=1e-4, eval_every=50),
    }

    teacher: HFTeacherConfig = Field(description="the teacher's directory")
    student: HFStudentConfig = Field(description="the student: a directory, a depth-pruned teacher or a config")
    tokenizer: str | None = Field(None, description="a tokenizer directory; null: the teacher's directory")
    torch_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the dtype teacher and student are loaded and trained in (autocast: `precision`)"
    )
    data: HFDataConfig = Field(description="the text or chat data")
    loss: LossConfig = Field(
        LossConfig(),
        description="the distillation objective (the engine's, as the lm recipe's), with on_policy and sequence_kd",
    )
    adversarial: AdversarialConfig = Field(AdversarialConfig(), description="adversarial distillation; off by default")
    baseline: bool = Field(True, description="also train the student without a teacher, for the same steps")
    samples: SamplesConfig = Field(SamplesConfig(), description="completions of held-out prompts (text data)")

    @model_validator(mode="after")
    def _prompts_fit(self):
        """Text data: the on-policy and sequence-level KD prompts (the first prompt_tokens of a block) leave a
        continuation within data.seq_len. (Chat prompts are checked against the data in `prepare`.)"""
        if self.data.format == "text":
            for name, used in (
                ("on_policy", self.loss.on_policy.fraction > 0),
                ("sequence_kd", self.loss.sequence_kd.enabled),
            ):
                prompt_tokens = getattr(self.loss, name).prompt_tokens
                if used and prompt_tokens >= self.data.seq_len:
                    raise ValueError(
                        f"loss.{name}.prompt_tokens={prompt_tokens} must be less than data.seq_len={self.data.seq_len}"
                    )
        return self


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> HFLMConfig:
    """The recipe in YAML file `path` with `key=value` overrides. Raises FileNotFoundError for a missing file,
    ValueError for a bad key or value (teacher, student and data have no defaults: they must be given)."""
    return HFLMConfig.model_validate(read_recipe(path, overrides))


# ----------------------------------------------------------------------------------------------------------
# Checks before training


def model_directory(path: str, option: str) -> Path:
    """`path` as a Hugging Face model directory. Raises FileNotFoundError when missing, ValueError naming `option`
    when it has no config.json."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{option}={path!r}: no such directory")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{option}={path!r} is not a Hugging Face model directory (no config.json)")
    return directory


def text_config(directory: Path, option: str):
    """The text config (vocab_size, max_position_embeddings) of the model in `directory`."""
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True).get_text_config()
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"{option}={str(directory)!r}: not a model config transformers can read: {error}") from None


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(directory: Path, option: str):
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as error:
        raise ValueError(f"{option}={str(directory)!r}: no tokenizer transformers can load: {error}") from None


def same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


@dataclass(frozen=True)
class Prepared:
    """What `prepare` checked and built: the directories, the tokenizer, the shared vocabulary K and the data."""

    teacher_dir: Path
    student_dir: Path | None
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    vocab_size: int  # K: the first K tokens of both models' vocabularies, the tokenizer's included
    data: TaskData
    loss: LossConfig  # config.loss with on_policy and sequence_kd max_new_tokens resolved (`generation_lengths`)


def check_models(config: HFLMConfig) -> tuple[Path, Path | None, Any, int, int]:
    """(teacher dir, student dir or None, tokenizer, shared vocabulary K, context: the smaller
    max_position_embeddings). Raises ValueError (FileNotFoundError) for anything that cannot be distilled."""
    teacher_dir = model_directory(config.teacher.pretrained, "teacher.pretrained")
    teacher = text_config(teacher_dir, "teacher.pretrained")
    if config.tokenizer is not None:
        tokenizer_dir = Path(config.tokenizer)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer={config.tokenizer!r}: no such directory")
        tokenizer = load_tokenizer(tokenizer_dir, "tokenizer")
        if has_tokenizer(teacher_dir):
            own = load_tokenizer(teacher_dir, "teacher.pretrained")
            if not same_vocabulary(tokenizer, own):
                raise ValueError(
                    f"tokenizer={config.tokenizer!r} ({len(tokenizer)} tokens) is not the teacher's tokenizer "
                    f"({len(own)} tokens, {teacher_dir}): their vocabularies differ"
                )
    elif has_tokenizer(teacher_dir):
        tokenizer = load_tokenizer(teacher_dir, "teacher.pretrained")
    else:
        raise ValueError(f"teacher.pretrained={str(teacher_dir)!r} has no tokenizer: set tokenizer=DIR")
    if not tokenizer.is_fast:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer (token offsets needed)")
    if len(tokenizer) > teacher.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is {teacher.vocab_size}: "
            "it is not the teacher's tokenizer"
        )

    student_dir, contexts = None, [teacher.max_position_embeddings]
    student_vocab = teacher.vocab_size
    if config.student.pretrained is not None:
        student_dir = model_directory(config.student.pretrained, "student.pretrained")
        student = text_config(student_dir, "student.pretrained")
        student_vocab = student.vocab_size
        contexts.append(student.max_position_embeddings)
        if has_tokenizer(student_dir):
            own = load_tokenizer(student_dir, "student.pretrained")
            if not same_vocabulary(own, tokenizer):
                raise ValueError(
                    f"teacher and student tokenizers differ: {len(tokenizer)} tokens (teacher) vs {len(own)} "
                    f"(student, {student_dir}); distillation across tokenizers is not supported"
                )
    elif config.student.config is not None:
        student = student_model_config(AutoConfig.from_pretrained(teacher_dir, local_files_only=True), config)
        student_vocab = student.vocab_size
        contexts.append(student.max_position_embeddings)
    if student_vocab < len(tokenizer):
        raise ValueError(
            f"the student's vocab_size {student_vocab} is smaller than the tokenizer's {len(tokenizer)} tokens "
            f"(teacher vocab_size {teacher.vocab_size})"
        )
    return teacher_dir, student_dir, tokenizer, min(teacher.vocab_size, student_vocab), min(contexts)


def prepare_inputs(config: HFLMConfig) -> Prepared:
    """Every check and the data (see the module docstring), before any model is loaded."""
    teacher_dir, student_dir, tokenizer, vocab_size, context = check_models(config)
    if config.data.seq_len > context:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is beyond the models' context (max_position_embeddings={context})"
        )
    data = build_hf_data(config.data, tokenizer)
    for name in SPLITS:
        labels = data.split(name)["labels"]
        if int(labels.max()) >= vocab_size:
            raise ValueError(f"the {name} split has label {int(labels.max())}, past the shared vocabulary {vocab_size}")
    loss = generation_lengths(config, data, context)
    return Prepared(teacher_dir, student_dir, tokenizer, vocab_size, data, loss)


def generation_lengths(config: HFLMConfig, data: TaskData, context: int) -> LossConfig:
    """config.loss with `max_new_tokens` of loss.on_policy (when fraction > 0) and loss.sequence_kd (when enabled)
    resolved: as given, or the rest of data.seq_len after the prompt (text: prompt_tokens; chat: the longest
    prompt of the training split), the same on every rank. Raises ValueError naming the option when a prompt
    leaves nothing to generate or a prompt plus its continuation is longer than the models' `context`."""
    updates = {}
    for name, used in (
        ("on_policy", config.loss.on_policy.fraction > 0),
        ("sequence_kd", config.loss.sequence_kd.enabled),
    ):
        section = getattr(config.loss, name)
        if not used:
            continue
        if config.data.format == "text":
            prompt, what = section.prompt_tokens, f"loss.{name}.prompt_tokens={section.prompt_tokens}"
        else:
            prompt = int(data.train[PROMPT_LENGTHS].max())
            what = f"the longest chat prompt of the training split ({prompt} tokens before its assistant turn)"
        steps = section.max_new_tokens or config.data.seq_len - prompt
        if steps < 1:
            raise ValueError(
                f"{what} leaves no token to generate within data.seq_len={config.data.seq_len}: "
                f"set loss.{name}.max_new_tokens"
            )
        if prompt + steps > context:
            raise ValueError(
                f"{what} plus loss.{name}.max_new_tokens={steps} is longer than the models' context "
                f"(max_position_embeddings={context})"
            )
        updates[name] = section.model_copy(update={"max_new_tokens": steps})
    return config.loss.model_copy(update=updates)


def prepare(config: HFLMConfig) -> Callable[..., dict]:
    """The job of `config`, `job(resume=False)`, every check done and the data built now (ValueError or
    FileNotFoundError before any training)."""
    return partial(run, config, prepared=prepare_inputs(config))


# ----------------------------------------------------------------------------------------------------------
# Data


def build_hf_data(config: HFDataConfig, tokenizer) -> TaskData:
    """The task tensors of `config.source` tokenized by `tokenizer` (`tokenize_splits`), cached in
    `config.cache_dir` under a fingerprint of the source files (paths, sizes, modification times), the data
    options and the tokenizer (vocabulary, special tokens, chat template): a second run loads them. Raises
    ValueError or FileNotFoundError on bad data."""
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    key = fingerprint(
        DATA_VERSION,
        config.model_dump(exclude={"cache_dir"}),
        source_stamp(Path(config.source)),
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.chat_template,
        pad_id,
        tokenizer.eos_token_id,
    )
    path = Path(config.cache_dir) / "hf_lm" / f"data-{key}.pt"
    if path.is_file():
        state = load_weights_only(path)
    else:
        state = tokenize_splits(config, tokenizer, pad_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(state, path)
    tensors = state["tensors"]
    if config.max_train_examples is not None:
        tensors["train"] = random_rows(tensors["train"], config.max_train_examples)
    return TaskData(
        task="lm",
        **tensors,
        tokenizer=tokenizer.backend_tokenizer,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id,
        vocab_size=len(tokenizer),
        class_names=None,
        num_documents=state["num_documents"],
    )


def source_stamp(path: Path) -> list | None:
    """What identifies a source's content cheaply: (path, size, mtime) of the file, or of every file under the
    directory; None when it does not exist (reading it then raises)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files] or None


def tokenize_splits(config: HFDataConfig, tokenizer, pad_id: int) -> dict:
    """{"tensors": {split: tensors}, "num_documents": {split: count}}: text, `lm_blocks` (input_ids, labels) of
    the documents joined by EOS; chat, `chat_rows` (input_ids, attention_mask, labels)."""
    if config.format == "text":
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token, which separates the documents of text data")
        splits = load_splits(DataConfig(source=config.source, text_field=config.text_field, splits=config.splits))
        tensors = {}
        for name, documents in splits.items():
            ids = tokenizer([d.text for d in documents], add_special_tokens=False).input_ids
            tensors[name] = lm_blocks(ids, tokenizer.eos_token_id, config.seq_len)
            if len(tensors[name]["input_ids"]) == 0:
                raise ValueError(
                    f"{config.source}: the {name} split has too few tokens for one block of seq_len + 1 = "
                    f"{config.seq_len + 1}; add text or lower data.seq_len"
                )
    else:
        conversations = read_conversations(config.source, config.messages_field)
        splits = conversations if isinstance(conversations, dict) else split_documents(conversations, config.splits)
        tensors = {
            name: chat_rows(tokenizer, split, config.seq_len, pad_id, f"{config.source} [{name}]")
            for name, split in splits.items()
        }
    return {"tensors": tensors, "num_documents": {name: len(split) for name, split in splits.items()}}


def assistant_token_mask(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[bool]]:
    """The token ids of the conversation rendered by the chat template, and per token whether it belongs to an
    assistant turn (found by incremental rendering, see the module docstring). Raises ValueError naming `where`
    when the template is not prefix-stable."""

    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"{where}: the chat template does not render this conversation incrementally (messages[:{i}] plus "
                f"the generation prompt, then messages[:{i + 1}], are not prefixes of the whole text), so its "
                "assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= first < end for start, end in spans) for first, _ in encoding.offset_mapping]
    return encoding.input_ids, mask


def chat_rows(tokenizer, conversations: Sequence[Conversation], seq_len: int, pad_id: int, where: str) -> dict:
    """One row per conversation: `input_ids` (M, seq_len) int64, its first seq_len tokens right-padded with
    pad_id; `attention_mask` (M, seq_len) bool; `labels` (M, seq_len) int64, the next token where that token is
    an assistant token, else IGNORE_INDEX; PROMPT_LENGTHS (M,) int64, the tokens before the first assistant token
    (the prompt of on-policy and sequence-level KD). A conversation whose assistant tokens all lie past
    seq_len + 1 tokens is left out; ValueError when none is left."""
    rows = []
    for number, conversation in enumerate(conversations):
        ids, assistant = assistant_token_mask(tokenizer, conversation.messages, f"{where} conversation {number}")
        ids, assistant = ids[: seq_len + 1], assistant[: seq_len + 1]
        if any(assistant[1:]):
            rows.append((ids, assistant))
    if not rows:
        raise ValueError(f"{where}: no conversation has an assistant token within data.seq_len={seq_len} + 1 tokens")
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    prompt_lengths = torch.zeros(len(rows), dtype=torch.int64)
    for row, (ids, assistant) in enumerate(rows):
        tokens = torch.tensor(ids, dtype=torch.int64)
        n = len(ids) - 1
        input_ids[row, :n], attention_mask[row, :n] = tokens[:-1], True
        labels[row, :n] = torch.where(torch.tensor(assistant[1:]), tokens[1:], IGNORE_INDEX)
        prompt_lengths[row] = assistant.index(True, 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, PROMPT_LENGTHS: prompt_lengths}


# ----------------------------------------------------------------------------------------------------------
# Models


class SharedVocabularyLM(HFModel):
    """An `HFModel` of a causal LM whose `lm_head_weight` and `logits` cover its first `vocab_size` tokens only
    (the rows of an embedding padded past the tokenizer are left out): the first K columns, as the distillation
    ops' `vocab_size=K` option compares, for the losses, the evaluation and the agreement alike."""

    def __init__(self, model, vocab_size: int):
        super().__init__(model)
        self.vocab_size = vocab_size

    @property
    def lm_head_weight(self) -> Tensor:
        return super().lm_head_weight[: self.vocab_size]

    def logits(self, hidden: Tensor) -> Tensor:
        bias = self.model.get_output_embeddings().bias
        return F.linear(hidden, self.lm_head_weight, None if bias is None else bias[: self.vocab_size])

    def generate(self, prompt_ids: Tensor, max_new_tokens: int, **options) -> Tensor:
        """`HFModel.generate` (the model's own generate) over the first vocab_size tokens only: the padding of the
        embedding (tokens no tokenizer id stands for) is never generated; a token there is a ValueError."""
        out = super().generate(prompt_ids, max_new_tokens, vocab_limit=self.vocab_size, **options)
        padding = out[:, prompt_ids.shape[1] :] >= self.vocab_size
        if padding.any():
            token = int(out[:, prompt_ids.shape[1] :][padding][0])
            raise ValueError(
                f"generated token {token} is in the embedding's padding (the shared vocabulary is {self.vocab_size})"
            )
        return out


def load_causal_lm(directory: Path, dtype: torch.dtype, option: str):
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    except (ValueError, OSError) as error:
        raise ValueError(f"{option}={str(directory)!r}: not a causal LM transformers can load: {error}") from None


def build_student(config: HFLMConfig, prepared: Prepared, teacher):
    """The student (a PreTrainedModel), identical for every variant: seeded, from its directory, the teacher's
    blocks or the teacher's config with the overrides."""
    dtype = DTYPES[config.torch_dtype]
    torch.manual_seed(config.seed + 1)
    spec = config.student
    if spec.pretrained is not None:
        return load_causal_lm(prepared.student_dir, dtype, "student.pretrained")
    if spec.from_teacher is not None:
        return layer_subset_student(teacher, spec.from_teacher.layers)
    return AutoModelForCausalLM.from_config(student_model_config(teacher.config, config), dtype=dtype)


def student_model_config(teacher_config, config: HFLMConfig):
    """The teacher's config with the attributes of `student.config` changed. Raises ValueError naming the
    attributes that the teacher's config does not have, or the config transformers refuses."""
    overrides = config.student.config
    unknown = sorted(name for name in overrides if not hasattr(teacher_config, name))
    if unknown:
        raise ValueError(f"student.config: {unknown} are not attributes of {type(teacher_config).__name__}")
    values = {**teacher_config.to_dict(), **overrides}
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        values.pop("layer_types", None)  # one entry per teacher block: the config derives the student's
    try:
        return type(teacher_config).from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"student.config={overrides}: {error}") from None


def sequence_kd_train(config: HFLMConfig, prepared: Prepared, teacher, device: torch.device) -> dict[str, Tensor]:
    """The training split of sequence-level KD: the teacher's completions of the training prompts (text: the first
    loss.sequence_kd.prompt_tokens of each block; chat: each conversation's tokens before its first assistant
    token), `teacher_completions` cached under loss.sequence_kd.dir (null: data.cache_dir/hf_lm/sequence_kd) by a
    fingerprint of the teacher's files, dtype and vocabulary, the training tensors and the sampling settings."""
    seq_kd, data = prepared.loss.sequence_kd, prepared.data
    key = fingerprint(
        source_stamp(prepared.teacher_dir),
        config.torch_dtype,
        prepared.vocab_size,
        data_fingerprint(data),
        seq_kd.prompt_tokens,
        seq_kd.max_new_tokens,
        seq_kd.temperature,
        config.seed,
    )
    directory = Path(seq_kd.dir) if seq_kd.dir else Path(config.data.cache_dir) / "hf_lm" / "sequence_kd"
    sequences = teacher_completions(
        teacher,
        data.train,
        directory / key,
        prompt_tokens=seq_kd.prompt_tokens,
        max_new_tokens=seq_kd.max_new_tokens,
        temperature=seq_kd.temperature,
        fingerprint=key,
        batch_size=config.training.batch_size,
        device=device,
        seed=config.seed,
        progress=config.logging.progress,
    )
    prompts = data.train[PROMPT_LENGTHS] if PROMPT_LENGTHS in data.train else seq_kd.prompt_tokens
    return sequence_kd_split(sequences, prompts, data.eos_id)


def save_student(model, tokenizer, directory: Path) -> None:
    """The student as a Hugging Face directory: `save_pretrained` and its tokenizer (`from_pretrained` loads it,
    with the attention implementation transformers picks by default)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------
# The run


def run(config: HFLMConfig, resume: bool = False, prepared: Prepared | None = None) -> dict:
    """Run the recipe (on `prepared` when already checked and built); returns {model name: {metric: value}} (also
    written to output_dir/results.json)."""
    prepared = prepared or prepare_inputs(config)
    device, precision, out_dir = start_run(config)
    data = prepared.data
    console.print(data.summary())
    dtype = DTYPES[config.torch_dtype]
    teacher_model = load_causal_lm(prepared.teacher_dir, dtype, "teacher.pretrained")
    teacher = SharedVocabularyLM(teacher_model, prepared.vocab_size).to(device)
    teachers = Teachers([teacher], [1.0], "lm")
    student_data = data  # what the distilled students train on: the teacher's completions with sequence-level KD
    if prepared.loss.sequence_kd.enabled:
        student_data = dataclasses.replace(data, train=sequence_kd_train(config, prepared, teacher, device))

    def phase(name: str, adversarial: AdversarialConfig) -> Phase:
        return Phase(name, out_dir / name, config.training, config.seed, device, precision, adversarial, config.logging)

    variants = [("distilled", config.adversarial, True)]
    if config.adversarial.method != "none" and config.adversarial.compare:
        variants.append(("distilled_no_adversarial", config.adversarial.model_copy(update={"method": "none"}), True))
    if config.baseline:
        variants.append(("baseline", config.adversarial, False))
    students, fits = {}, {}
    for name, adversarial, distilled in variants:
        student = SharedVocabularyLM(build_student(config, prepared, teacher_model), prepared.vocab_size)
        objective = DistillationObjective(prepared.loss, "lm", student.config, teacher.config if distilled else None)
        distiller = Distiller(
            student,
            objective,
            student_data if distilled else data,
            phase(name, adversarial),
            teachers if distilled else None,
            agreement_with=teachers,
        )
        fits[name] = distiller.fit(resume)
        students[name] = student
        save_student(student.model, prepared.tokenizer, out_dir / name / "model")
    results = evaluate_all(config, data, {"teacher": teacher, **students}, fits, device, precision)
    write_report(config, data, results, out_dir)
    return results
