"""The Hugging Face causal-LM recipe (`recipe: hf_lm`, configs/hf_lm.yaml): a teacher and a student loaded from
local `AutoModelForCausalLM` directories (nothing is downloaded), distilled by the engine off-policy, on-policy
(`loss.on_policy`) or on the teacher's completions (`loss.sequence_kd`).

    python train.py --config configs/hf_lm.yaml teacher.pretrained=DIR data.source=chat.jsonl

1. Models: `teacher.pretrained` (a directory with config.json and weights), the student one of
   `student.pretrained` (another directory), `student.from_teacher.layers` (depth pruning: the teacher's
   embeddings, head and the listed blocks, `layer_subset_student`) or `student.config` (the teacher's config
   with these overrides, randomly initialized); both in `torch_dtype`. The teacher's tokenizer is its directory's
   (`AutoTokenizer`) or `tokenizer`; the student's is `student.tokenizer`, else student.pretrained's directory's
   tokenizer when it has one, else the teacher's. A student tokenizer of another vocabulary than the teacher's
   makes the run a cross-tokenizer one (6.).
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
   below K. (Across tokenizers, 6., each model's distributions cover its own tokenizer's tokens.)
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
6. Across tokenizers (text data, off-policy; the engine's path of the lm recipe with `teachers[i].tokenizer`):
   every document is tokenized by both fast tokenizers with offsets, which give each token's bytes of the text
   (`token_byte_lengths`), and the two streams are aligned once in the data pipeline (`cross_tokenizer_blocks`: the
   teacher's tokens of each student block and both sides' groups), cached with the tokenized splits. The students
   train in their own tokens; the teacher scores its own (`OwnTokenizerTeachers` with the `vocabulary_map` of the
   two tokenizers) and the logit loss is `fused_linear_cross_tokenizer_loss` with `loss.cross_tokenizer`
   (exact_weight, uld_weight, uld_top_k) plus hard_weight x cross-entropy in the student's tokens. Validation and
   test report bits per byte for every model, the teacher's on the held-out text in its own tokens, and the share
   of the baseline-teacher gap closed is in bits per byte (perplexities of different tokenizers are not comparable;
   no agreement, KL or samples across vocabularies). Each student is saved with its own tokenizer. A ValueError
   naming the option, before training, for what does not combine: data.format chat, loss.on_policy,
   loss.sequence_kd, student.from_teacher (the teacher's embeddings are of its vocabulary), and the loss and
   adversarial options of `cross_tokenizer_unmet` (hidden-state and attention terms, label smoothing, scale_by_t2
   false, adversarial training).

Every check (directories, tokenizers, vocabularies, the options across tokenizers, sequence length against
max_position_embeddings, the data, a prompt plus its continuation against max_position_embeddings) runs in
`prepare`, before any training; text prompt_tokens below data.seq_len is checked when the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tsa_fast.cross_tokenizer import token_byte_lengths, token_bytes, vocabulary_map
from tsa_fast.distill.checkpoints import load_weights_only, save_atomically
from tsa_fast.distill.config import AdversarialConfig, LossConfig, Section, TrainingConfig, cross_tokenizer_unmet
from tsa_fast.distill.data import (
    SPLITS,
    Conversation,
    DataConfig,
    TaskData,
    block_label_bytes,
    cross_tokenizer_blocks,
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
from tsa_fast.distill.teachers import OwnTokenizerTeachers, Teachers
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
    tokenizer: str | None = Field(
        None,
        description="the student's own tokenizer directory; null: student.pretrained's tokenizer where its directory "
        "has one, else the teacher's. One of another vocabulary than the teacher's: cross-tokenizer distillation",
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
    """What `prepare` checked and built: the directories, the tokenizers, the vocabularies and the data."""

    teacher_dir: Path
    student_dir: Path | None
    tokenizer: Any  # the students' PreTrainedTokenizerFast (the teacher's, unless the student has one of its own)
    vocab_size: int  # K: the students' distributions cover their first K tokens (one tokenizer: both models')
    data: TaskData  # in the students' tokens (across tokenizers: also the teacher's tokens and the alignment)
    loss: LossConfig  # config.loss with on_policy and sequence_kd max_new_tokens resolved (`generation_lengths`)
    teacher_tokenizer: Any  # the teacher's (the same object as `tokenizer` with one tokenizer)
    teacher_vocab_size: int  # the teacher's distributions cover its first teacher_vocab_size tokens
    teacher_data: TaskData  # the held-out text in the teacher's tokens, for its metrics (`data` with one tokenizer)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the student has a tokenizer of another vocabulary than the teacher's."""
        return self.teacher_tokenizer is not self.tokenizer


def directory_tokenizer(given: str | None, option: str, model_dir: Path | None, model_option: str):
    """The tokenizer of directory `given` (option `option`), which must be the one of `model_dir` when that has
    one; without `given`, the one of `model_dir`; None when neither has one. Raises FileNotFoundError,
    ValueError naming the option."""
    own = load_tokenizer(model_dir, model_option) if model_dir is not None and has_tokenizer(model_dir) else None
    if given is None:
        return own
    if not Path(given).is_dir():
        raise FileNotFoundError(f"{option}={given!r}: no such directory")
    tokenizer = load_tokenizer(Path(given), option)
    if own is not None and not same_vocabulary(tokenizer, own):
        raise ValueError(
            f"{option}={given!r} ({len(tokenizer)} tokens) is not the {model_option.split('.')[0]}'s tokenizer "
            f"({len(own)} tokens, {model_dir}): their vocabularies differ"
        )
    return tokenizer


def check_fast(tokenizer, option: str) -> None:
    if not tokenizer.is_fast:
        raise ValueError(
            f"{option}: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer (token offsets needed)"
        )


def check_models(config: HFLMConfig) -> tuple[Path, Path | None, Any, int, Any, int, int]:
    """(teacher dir, student dir or None, the students' tokenizer, their vocabulary K, the teacher's tokenizer
    (the same object when the student has none of its own, or one of the same vocabulary), its vocabulary, context:
    the smaller max_position_embeddings). One tokenizer: K is the first K = min(teacher, student vocab_size) tokens
    of both models; across tokenizers each model's K is its tokenizer's size. Raises ValueError (FileNotFoundError)
    for anything that cannot be distilled."""
    teacher_dir = model_directory(config.teacher.pretrained, "teacher.pretrained")
    teacher = text_config(teacher_dir, "teacher.pretrained")
    tokenizer = directory_tokenizer(config.tokenizer, "tokenizer", teacher_dir, "teacher.pretrained")
    if tokenizer is None:
        raise ValueError(f"teacher.pretrained={str(teacher_dir)!r} has no tokenizer: set tokenizer=DIR")
    check_fast(tokenizer, "tokenizer" if config.tokenizer else "teacher.pretrained")
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
    elif config.student.config is not None:
        student = student_model_config(AutoConfig.from_pretrained(teacher_dir, local_files_only=True), config)
        student_vocab = student.vocab_size
        contexts.append(student.max_position_embeddings)
    own = directory_tokenizer(config.student.tokenizer, "student.tokenizer", student_dir, "student.pretrained")
    if own is None or same_vocabulary(own, tokenizer):
        if student_vocab < len(tokenizer):
            raise ValueError(
                f"the student's vocab_size {student_vocab} is smaller than the tokenizer's {len(tokenizer)} tokens "
                f"(teacher vocab_size {teacher.vocab_size})"
            )
        vocab_size = min(teacher.vocab_size, student_vocab)
        return teacher_dir, student_dir, tokenizer, vocab_size, tokenizer, vocab_size, min(contexts)
    check_fast(own, "student.tokenizer" if config.student.tokenizer else "student.pretrained")
    check_cross_tokenizer(config, len(own), len(tokenizer))
    if student_vocab < len(own):
        raise ValueError(
            f"the student's vocab_size {student_vocab} is smaller than its tokenizer's {len(own)} tokens"
            + (" (set student.config.vocab_size)" if config.student.config is not None else "")
        )
    return teacher_dir, student_dir, own, len(own), tokenizer, len(tokenizer), min(contexts)


def check_cross_tokenizer(config: HFLMConfig, student_tokens: int, teacher_tokens: int) -> None:
    """A student tokenizer of its own: only the options that apply across tokenizers (text data, off-policy, a
    student from its directory or a config; `cross_tokenizer_unmet` for the loss). Raises ValueError naming every
    option that does not."""
    needs = {
        "data.format='text'": config.data.format == "text",
        "student.pretrained or student.config (not student.from_teacher: the teacher's embeddings are of another "
        "vocabulary)": config.student.from_teacher is None,
    }
    unmet = [name for name, met in needs.items() if not met] + cross_tokenizer_unmet(config.loss, config.adversarial)
    if unmet:
        raise ValueError(
            f"a student tokenizer of its own ({student_tokens} tokens, the teacher's {teacher_tokens}: "
            f"cross-tokenizer distillation) needs {', '.join(unmet)}"
        )


def prepare_inputs(config: HFLMConfig) -> Prepared:
    """Every check and the data (see the module docstring), before any model is loaded."""
    teacher_dir, student_dir, tokenizer, vocab_size, teacher_tokenizer, teacher_vocab_size, context = check_models(
        config
    )
    if config.data.seq_len > context:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is beyond the models' context (max_position_embeddings={context})"
        )
    data, teacher_data = build_hf_data(
        config.data, tokenizer, None if teacher_tokenizer is tokenizer else teacher_tokenizer
    )
    for name in SPLITS:
        labels = data.split(name)["labels"]
        if int(labels.max()) >= vocab_size:
            raise ValueError(f"the {name} split has label {int(labels.max())}, past the shared vocabulary {vocab_size}")
        teacher_labels = teacher_data.split(name)["labels"]
        if int(teacher_labels.max()) >= teacher_vocab_size:
            raise ValueError(
                f"the {name} split in the teacher's tokens has label {int(teacher_labels.max())}, past the teacher's "
                f"vocabulary {teacher_vocab_size}"
            )
    loss = generation_lengths(config, data, context)
    return Prepared(
        teacher_dir, student_dir, tokenizer, vocab_size, data, loss, teacher_tokenizer, teacher_vocab_size, teacher_data
    )


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


def build_hf_data(config: HFDataConfig, tokenizer, teacher_tokenizer=None) -> tuple[TaskData, TaskData]:
    """(the students' data, the teacher's): the task tensors of `config.source` tokenized by `tokenizer`
    (`tokenize_splits`), the same object twice; with `teacher_tokenizer` (a student tokenizer of its own, text),
    the students' also hold the teacher's tokens and the alignment (`cross_tokenizer_blocks`) and the teacher's
    are the blocks in its tokens, both with `label_bytes` on validation and test (bits per byte). Cached in
    `config.cache_dir` under a fingerprint of the source files (paths, sizes, modification times), the data
    options and the tokenizers (vocabulary, special tokens, chat template): a second run loads them. Raises
    ValueError or FileNotFoundError on bad data."""
    pad_id = pad_token_id(tokenizer)
    key = fingerprint(
        DATA_VERSION,
        config.model_dump(exclude={"cache_dir"}),
        source_stamp(Path(config.source)),
        tokenizer.backend_tokenizer.to_str(),
        tokenizer.chat_template,
        pad_id,
        tokenizer.eos_token_id,
        *(() if teacher_tokenizer is None else ("teacher", teacher_tokenizer.backend_tokenizer.to_str())),
    )
    path = Path(config.cache_dir) / "hf_lm" / f"data-{key}.pt"
    if path.is_file():
        state = load_weights_only(path)
    else:
        state = tokenize_splits(config, tokenizer, pad_id, teacher_tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(state, path)
    tensors = state["tensors"]
    if config.max_train_examples is not None:
        tensors["train"] = random_rows(tensors["train"], config.max_train_examples)
    data = task_data(tensors, tokenizer, state["num_documents"], teacher_tokenizer)
    if teacher_tokenizer is None:
        return data, data
    return data, task_data(state["teacher_tensors"], teacher_tokenizer, state["num_documents"])


def pad_token_id(tokenizer) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def task_data(tensors: dict, tokenizer, num_documents: dict, teacher_tokenizer=None) -> TaskData:
    pad_id = pad_token_id(tokenizer)
    return TaskData(
        task="lm",
        **tensors,
        tokenizer=tokenizer.backend_tokenizer,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id,
        vocab_size=len(tokenizer),
        class_names=None,
        num_documents=num_documents,
        teacher_tokenizer=None if teacher_tokenizer is None else teacher_tokenizer.backend_tokenizer,
    )


def source_stamp(path: Path) -> list | None:
    """What identifies a source's content cheaply: (path, size, mtime) of the file, or of every file under the
    directory; None when it does not exist (reading it then raises)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files] or None


def tokenize_splits(config: HFDataConfig, tokenizer, pad_id: int, teacher_tokenizer=None) -> dict:
    """{"tensors": {split: tensors}, "num_documents": {split: count}}: text, `lm_blocks` (input_ids, labels) of
    the documents joined by EOS; chat, `chat_rows` (input_ids, attention_mask, labels). With `teacher_tokenizer`
    (text), `cross_tokenizer_splits`."""
    if config.format == "text":
        for by, whose in ((tokenizer, "the tokenizer"), (teacher_tokenizer, "the teacher's tokenizer")):
            if by is not None and by.eos_token_id is None:
                raise ValueError(f"{whose} has no EOS token, which separates the documents of text data")
        splits = load_splits(DataConfig(source=config.source, text_field=config.text_field, splits=config.splits))
        if teacher_tokenizer is not None:
            return cross_tokenizer_splits(config, splits, tokenizer, teacher_tokenizer)
        tensors = {}
        for name, documents in splits.items():
            ids = tokenizer([d.text for d in documents], add_special_tokens=False).input_ids
            tensors[name] = lm_blocks(ids, tokenizer.eos_token_id, config.seq_len)
            check_blocks(tensors[name], config, name)
    else:
        conversations = read_conversations(config.source, config.messages_field)
        splits = conversations if isinstance(conversations, dict) else split_documents(conversations, config.splits)
        tensors = {
            name: chat_rows(tokenizer, split, config.seq_len, pad_id, f"{config.source} [{name}]")
            for name, split in splits.items()
        }
    return {"tensors": tensors, "num_documents": {name: len(split) for name, split in splits.items()}}


def check_blocks(blocks: dict, config: HFDataConfig, name: str, whose: str = "") -> None:
    if len(blocks["input_ids"]) == 0:
        raise ValueError(
            f"{config.source}: the {name} split has too few tokens{whose} for one block of seq_len + 1 = "
            f"{config.seq_len + 1}; add text or lower data.seq_len"
        )


def cross_tokenizer_splits(config: HFDataConfig, splits: dict, tokenizer, teacher_tokenizer) -> dict:
    """The text splits in two tokenizations: {"tensors": the students' `cross_tokenizer_blocks` (their blocks, the
    teacher's tokens of the same text and the alignment), "teacher_tensors": the teacher's `lm_blocks`,
    "num_documents"}; validation and test of both with `label_bytes`. Each document is tokenized by both
    tokenizers with offsets, which give each token's bytes of the text (`token_byte_lengths`), so both streams
    cover exactly the document's UTF-8 bytes."""
    tensors, teacher_tensors = {}, {}
    pieces = [np.array([len(p) for p in token_bytes(t)], dtype=np.int64) for t in (tokenizer, teacher_tokenizer)]
    for name, documents in splits.items():
        texts = [d.text for d in documents]
        (ids, sizes), (teacher_ids, teacher_sizes) = (
            offset_tokens(by, texts, table) for by, table in zip((tokenizer, teacher_tokenizer), pieces)
        )
        tensors[name] = cross_tokenizer_blocks(
            ids,
            teacher_ids,
            sizes,
            teacher_sizes,
            student_eos=tokenizer.eos_token_id,
            teacher_eos=teacher_tokenizer.eos_token_id,
            teacher_pad=pad_token_id(teacher_tokenizer),
            seq_len=config.seq_len,
        )
        teacher_tensors[name] = lm_blocks(teacher_ids, teacher_tokenizer.eos_token_id, config.seq_len)
        check_blocks(tensors[name], config, name)
        check_blocks(teacher_tensors[name], config, name, " in the teacher's tokens")
        if name != "train":
            tensors[name]["label_bytes"] = block_label_bytes(sizes, config.seq_len)
            teacher_tensors[name]["label_bytes"] = block_label_bytes(teacher_sizes, config.seq_len)
    return {
        "tensors": tensors,
        "teacher_tensors": teacher_tensors,
        "num_documents": {name: len(split) for name, split in splits.items()},
    }


def offset_tokens(tokenizer, texts: list[str], pieces: np.ndarray) -> tuple[list[list[int]], list[np.ndarray]]:
    """Each text's token ids by `tokenizer` (no special tokens) and the bytes of the text each token covers
    (`token_byte_lengths` of its offsets; `pieces`: the bytes of each token id's piece)."""
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sizes = [
        token_byte_lengths(text, offsets, pieces[ids])
        for text, ids, offsets in zip(texts, encoding.input_ids, encoding.offset_mapping)
    ]
    return encoding.input_ids, sizes


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
    teacher = SharedVocabularyLM(teacher_model, prepared.teacher_vocab_size).to(device)
    teachers = Teachers([teacher], [1.0], "lm")
    source, agreement, alone = teachers, teachers, data
    if prepared.cross_tokenizer:  # the teacher scores its own tokens; no distribution of its is one of the student's
        console.print("teacher " + prepared.teacher_data.summary())
        pairs = vocabulary_map(prepared.tokenizer, prepared.teacher_tokenizer)
        source = OwnTokenizerTeachers(teachers, pairs).to(device)
        agreement, alone = None, data.without_teacher_tokens()
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
            student_data if distilled else alone,
            phase(name, adversarial),
            source if distilled else None,
            agreement_with=agreement,
        )
        fits[name] = distiller.fit(resume)
        students[name] = student
        save_student(student.model, prepared.tokenizer, out_dir / name / "model")
    data_of = {"teacher": prepared.teacher_data} if prepared.cross_tokenizer else None
    results = evaluate_all(config, data, {"teacher": teacher, **students}, fits, device, precision, data_of)
    write_report(config, data, results, out_dir)
    return results
