"""Generation: `Transformer.generate` (KV cache against full recomputation, left padding, sampling, EOS,
argument errors), `next_token`'s filters, `HFModel.generate` against transformers' eager attention, and the
`python -m tsa_fast.generate` command line on models saved to temporary directories."""

import functools
import re
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

from tsa_fast.backends import available_backends
from tsa_fast.models import Transformer, TransformerConfig, next_token

VOCAB = 97
TINY = dict(vocab_size=VOCAB, max_seq_len=40, d_model=32, n_layers=2, n_heads=4)
NEW = 24  # new tokens per test
PERIOD = 5


def make_model(positional: str = "rotary", **overrides) -> Transformer:
    """A tiny causal LM with N(0, 0.5) weights: far from GPT-2's initialization, so that sampling has
    some spread (a freshly initialized model's tied embedding makes it predict its last token)."""
    model = Transformer(TransformerConfig(**{**TINY, "positional": positional, **overrides})).to(DEVICE).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model


@functools.cache
def copying_model(positional: str) -> Transformer:
    """A tiny causal LM trained to continue a period-5 sequence: its greedy tokens are those PERIOD
    positions back, varied, so that a cache holding wrong keys, values or positions changes them."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**TINY, positional=positional)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator(DEVICE).manual_seed(0)
    for _ in range(150):
        ids = torch.randint(0, VOCAB, (32, PERIOD), device=DEVICE, generator=generator).repeat(1, 7)
        logits = model.logits(model(ids[:, :-1]).hidden)[:, PERIOD:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, PERIOD + 1 :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2, loss.item()
    return model.eval()


def random_ids(batch: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), device=DEVICE)


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D prompts left-padded to the longest with random ids (which must not matter), and the mask."""
    n = max(len(p) for p in prompts)
    ids = random_ids(len(prompts), n)
    mask = torch.zeros(len(prompts), n, dtype=torch.long, device=DEVICE)
    for row, prompt in enumerate(prompts):
        ids[row, n - len(prompt) :] = prompt
        mask[row, n - len(prompt) :] = 1
    return ids, mask


def greedy_by_forward(model: Transformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by the training forward on the whole sequence at every step (no cache, no padding)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model.logits(model(ids).hidden[:, -1]).argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("positional", ["rotary", "learned"])
def test_greedy_with_the_cache_equals_full_recomputation(positional):
    model, prompt = copying_model(positional), random_ids(3, 6)
    cached = model.generate(prompt, NEW, temperature=0)
    assert cached.shape == (3, 6 + NEW) and cached.dtype == torch.int64
    assert torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached[:, 6:], prompt[:, 1:6].repeat(1, 5)[:, :NEW])  # it continues the period
    assert torch.equal(cached, greedy_by_forward(model, prompt, NEW))
    assert torch.equal(cached, model.generate(prompt, NEW, temperature=0, use_cache=False))


@pytest.mark.parametrize("positional", ["rotary", "learned"])
def test_left_padded_batch_gives_each_prompt_alone(positional):
    model = copying_model(positional)
    prompts = [random_ids(1, n)[0] for n in (3, 9, 6, 9)]
    ids, mask = left_padded(prompts)
    batched = model.generate(ids, NEW, temperature=0, attention_mask=mask)
    assert torch.equal(batched, model.generate(ids, NEW, temperature=0, attention_mask=mask.bool(), use_cache=False))
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], NEW, temperature=0)[0]
        assert torch.equal(batched[row, ids.shape[1] - len(prompt) :], alone), row
        assert torch.equal(batched[row, : ids.shape[1]], ids[row])  # the padding is returned as given


def test_sampling_is_reproducible_for_a_seed():
    model, prompt = make_model(), random_ids(4, 5)

    def sample(seed: int, use_cache: bool = True, **options) -> torch.Tensor:
        generator = torch.Generator(DEVICE).manual_seed(seed)
        return model.generate(prompt, NEW, generator=generator, use_cache=use_cache, **options)

    for options in (dict(), dict(temperature=0.7, top_k=20), dict(top_p=0.9), dict(top_k=30, top_p=0.8)):
        first = sample(0, **options)
        assert torch.equal(first, sample(0, **options)), options
        assert torch.equal(first, sample(0, use_cache=False, **options)), options  # the same draws, no cache
        assert not torch.equal(first, sample(1, **options)), options
        assert not torch.equal(first, model.generate(prompt, NEW, temperature=0)), options


def test_next_token_filters():
    probabilities = torch.tensor([0.05, 0.5, 0.15, 0.3], device=DEVICE)
    logits = probabilities.log().expand(4000, 4)
    generator = torch.Generator(DEVICE).manual_seed(0)

    def drawn(**options) -> set[int]:
        return set(next_token(logits, 1.0, generator=generator, **options).tolist())

    assert next_token(logits, 0.0).unique().tolist() == [1]
    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=1) == {1} and drawn(top_k=2) == {1, 3} and drawn(top_k=3) == {1, 2, 3}
    # top_p keeps the most likely tokens until their probability reaches top_p: 0.5, then 0.8, then 0.95
    assert drawn(top_p=0.4) == {1} and drawn(top_p=0.5) == {1} and drawn(top_p=0.6) == {1, 3}
    assert drawn(top_p=0.9) == {1, 2, 3} and drawn(top_p=1.0) == {0, 1, 2, 3}
    assert drawn(top_k=2, top_p=0.9) == {1, 3}  # top_k first, then top_p among what is left
    tokens = next_token(logits, 1.0, generator=generator)  # the draws follow softmax(logits)
    frequencies = torch.bincount(tokens, minlength=4).double() / len(tokens)
    torch.testing.assert_close(frequencies, probabilities.double(), atol=0.03, rtol=0)


def test_eos_stops_a_row():
    model, prompt = copying_model("rotary"), random_ids(3, 5)
    free = model.generate(prompt, NEW, temperature=0)
    eos = free[0, 5 + 3].item()  # row 0's 4th new token (or an earlier one equal to it)
    stopped = model.generate(prompt, NEW, temperature=0, eos_id=eos)
    first_eos = [next((t for t in range(NEW) if free[row, 5 + t] == eos), None) for row in range(3)]
    lengths = [NEW if t is None else t + 1 for t in first_eos]
    assert stopped.shape == (3, 5 + max(lengths))
    for row, length in enumerate(lengths):
        assert torch.equal(stopped[row, : 5 + length], free[row, : 5 + length]), row
        assert (stopped[row, 5 + length :] == eos).all(), row  # a finished row emits eos_id
    alone = model.generate(prompt[:1], NEW, temperature=0, eos_id=eos)  # every row stopped: generation stops
    assert alone.shape == (1, 5 + lengths[0]) and alone[0, -1] == eos


def test_zero_new_tokens_inference_mode_and_training_mode_restored():
    model, prompt = make_model(dropout=0.5).train(), random_ids(2, 5)
    assert torch.equal(model.generate(prompt, 0), prompt)
    out = model.generate(prompt, NEW, temperature=0)
    assert model.training and not out.requires_grad
    assert torch.equal(out, model.eval().generate(prompt, NEW, temperature=0))  # no dropout while generating


BAD_ARGUMENTS = {  # name: (prompt from a (2, 5) prompt, generate's keyword arguments, message)
    "temperature < 0": (lambda p: p, dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    "temperature nan": (lambda p: p, dict(temperature=float("nan")), "temperature"),
    "top_p 0": (lambda p: p, dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\], got 0.0"),
    "top_p > 1": (lambda p: p, dict(top_p=1.5), "top_p .* got 1.5"),
    "top_k 0": (lambda p: p, dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
    "top_k float": (lambda p: p, dict(top_k=2.5), "top_k"),
    "max_new_tokens < 0": (lambda p: p, dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
    "max_new_tokens float": (lambda p: p, dict(max_new_tokens=3.0), "max_new_tokens"),
    "past the context": (lambda p: p, dict(max_new_tokens=36), r"5 \+ 36 tokens.*context, {context}"),
    "prompt past the context": (
        lambda p: p.repeat(1, 9),
        dict(max_new_tokens=0),
        r"prompt_ids has 45 tokens, more than the model's context, {context}",
    ),
    "float prompt": (lambda p: p.float(), {}, r"prompt_ids must be a non-empty \(B, N\) int64 tensor"),
    "int32 prompt": (lambda p: p.int(), {}, "prompt_ids .* got torch.int32"),
    "1-d prompt": (lambda p: p[0], {}, r"prompt_ids .* shape \(5,\)"),
    "empty prompt": (lambda p: p[:, :0], {}, "prompt_ids must be a non-empty"),
    "id out of range": (lambda p: p + VOCAB, {}, r"prompt_ids must be in \[0, 97\)"),
    "eos_id out of range": (lambda p: p, dict(eos_id=VOCAB), r"eos_id must be None or a token id in \[0, 97\)"),
    "right padding": (
        lambda p: p,
        dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])),
        "attention_mask must be left padding",
    ),
    "mask hole": (
        lambda p: p,
        dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])),
        "attention_mask must be left padding",
    ),
    "mask shape": (lambda p: p, dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), r"attention_mask .*\(2, 5\)"),
    "float mask": (lambda p: p, dict(attention_mask=torch.ones(2, 5)), "attention_mask must be bool or integer"),
}
TYPE_ERRORS = {
    "list prompt": (lambda p: p.tolist(), {}, "prompt_ids must be a torch.Tensor"),
    "seed as generator": (lambda p: p, dict(generator=0), "generator must be a torch.Generator"),
}


def check_bad_arguments(generate, case: str, context: str) -> None:
    cases = {**BAD_ARGUMENTS, **TYPE_ERRORS}
    prompt, options, message = cases[case]
    options = {"max_new_tokens": 4, **options}
    error = TypeError if case in TYPE_ERRORS else ValueError
    with pytest.raises(error, match=message.format(context=context)):
        generate(prompt(torch.randint(0, VOCAB, (2, 5))), **options)


@pytest.mark.parametrize("case", [*BAD_ARGUMENTS, *TYPE_ERRORS])
def test_bad_arguments_raise_naming_them(case):
    model = make_model()
    model.cpu()  # the id range is checked on CPU tensors
    check_bad_arguments(model.generate, case, "max_seq_len=40")


def test_an_encoder_does_not_generate():
    with pytest.raises(ValueError, match="causal language model"):
        make_model(causal=False).generate(random_ids(1, 3), 2)


def test_streamer_gets_each_step_as_chosen():
    model, prompt, steps = copying_model("rotary"), random_ids(2, 6), []
    out = model.generate(prompt, NEW, temperature=0, streamer=steps.append)
    assert len(steps) == NEW and torch.equal(torch.stack(steps, dim=1), out[:, 6:])


# ----------------------------------------------------------------------------------------------------------
# Hugging Face models: their own generate, on the fused attention


@pytest.fixture(scope="module")
def llama_directory(tmp_path_factory) -> str:
    """A tiny random Llama (GQA; N(0, 0.3) weights, for varied greedy tokens) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture
def llama(llama_directory):
    """(HFModel of the saved Llama, loaded back, its directory)."""
    from transformers import AutoModelForCausalLM

    from tsa_fast.integrations.hf import HFModel

    return HFModel(AutoModelForCausalLM.from_pretrained(llama_directory)).to(DEVICE), llama_directory


def test_hf_greedy_equals_eager_attention(llama):
    from transformers import AutoModelForCausalLM

    model, directory = llama
    assert model.model.config._attn_implementation == "tsa_fast"
    eager = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").to(DEVICE)
    ids, mask = left_padded([random_ids(1, n)[0] for n in (4, 9, 7)])
    expected = eager.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    steps = []
    out = model.generate(ids, NEW, temperature=0, attention_mask=mask, streamer=steps.append)
    assert out.shape == (3, 9 + NEW) and out.dtype == torch.int64
    assert len(out[:, 9:].unique()) > 4
    assert torch.equal(out, expected)
    assert torch.equal(torch.stack(steps, dim=1), out[:, 9:].cpu())
    alone = model.generate(ids[:1, 5:], NEW, temperature=0)  # left padding gives the prompt alone's tokens
    assert torch.equal(alone[0], out[0, 5:])


def test_hf_sampling_is_reproducible_and_leaves_the_global_rng(llama):
    model, _ = llama
    prompt = random_ids(3, 5)
    state = torch.get_rng_state()

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, NEW, top_k=40, top_p=0.95, generator=torch.Generator(DEVICE).manual_seed(seed))

    first = sample(0)
    assert torch.equal(first, sample(0)) and not torch.equal(first, sample(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_hf_eos_stops_a_row(llama):
    model, _ = llama
    prompt = random_ids(2, 5)
    free = model.generate(prompt, NEW, temperature=0)
    eos = free[0, 5 + 2].item()
    stopped = model.generate(prompt, NEW, temperature=0, eos_id=eos)
    first = next(t for t in range(NEW) if free[0, 5 + t] == eos)
    assert torch.equal(stopped[0, : 6 + first], free[0, : 6 + first])
    assert (stopped[0, 6 + first :] == eos).all()


@pytest.mark.parametrize("case", [*BAD_ARGUMENTS, *TYPE_ERRORS])
def test_hf_bad_arguments_raise_naming_them(llama, case):
    model, _ = llama
    model.cpu()
    check_bad_arguments(model.generate, case, "max_position_embeddings=40")


# ----------------------------------------------------------------------------------------------------------
# python -m tsa_fast.generate


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer like the engine's (<pad> and <eos> special), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["Return the sum of a and b.", "Open the file and read its lines."] * 20, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def cli_model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**{**TINY, "vocab_size": tokenizer.get_vocab_size(), "max_seq_len": 64}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def run_cli(*args: str) -> list[str]:
    """The command's stdout lines; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "tsa_fast.generate", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def expected_line(generate, encode, decode, prompt: str, **options) -> str:
    """What the command prints for `prompt`: the text of the prompt and its completion, as decoded at once."""
    ids = generate(torch.tensor([encode(prompt)]), **options)
    return decode(ids[0].tolist())


def test_cli_completes_prompts_of_a_transformer_directory(tmp_path, tokenizer, cli_model):
    cli_model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompts = ["Return the", "Open the file"]
    lines = run_cli(
        str(tmp_path), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "12", "--temperature", "0"
    )

    def generate(ids, **options):
        return cli_model.generate(ids, 12, temperature=0, eos_id=tokenizer.token_to_id("<eos>"))

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    expected = [expected_line(generate, lambda text: tokenizer.encode(text).ids, decode, p) for p in prompts]
    assert lines == expected
    assert all(line.startswith(p) and len(line) > len(p) for line, p in zip(lines, prompts))


def test_cli_run_directory_and_checkpoint_file_with_seeded_sampling(tmp_path, tokenizer, cli_model):
    """A run directory (the recipe's config.json, a phase with its checkpoint.pt and config.json, the
    tokenizer at the top) and a cached-teacher file {"config", "model"} with --tokenizer."""
    run = tmp_path / "run"
    (run / "distilled").mkdir(parents=True)
    (run / "config.json").write_text('{"name": "stdlib_lm", "teachers": [], "student": {}}')
    (run / "distilled" / "config.json").write_text(cli_model.config.model_dump_json())
    weights = {f"model.{key}": value for key, value in cli_model.state_dict().items()}
    torch.save({"module": weights, "optimizer": {}, "step": 3}, run / "distilled" / "checkpoint.pt")
    tokenizer.save(str(run / "tokenizer.json"))
    teacher = tmp_path / "teacher.pt"
    torch.save({"config": cli_model.config.model_dump(), "model": cli_model.state_dict()}, teacher)

    prompt, seed = "Return the", 7
    generator = torch.Generator().manual_seed(seed)
    ids = cli_model.generate(
        torch.tensor([tokenizer.encode(prompt).ids]),
        10,
        top_k=50,
        eos_id=tokenizer.token_to_id("<eos>"),
        generator=generator,
    )
    expected = [tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)]
    sampling = ["--prompt", prompt, "--max-new-tokens", "10", "--top-k", "50", "--seed", str(seed)]
    assert run_cli(str(run), *sampling) == expected
    assert run_cli(str(teacher), "--tokenizer", str(run / "tokenizer.json"), *sampling) == expected


def test_cli_hugging_face_directory(llama_directory, tmp_path, tokenizer):
    """An HF directory (a tiny Llama and a fast tokenizer saved with save_pretrained): greedy completions are
    those of the model's own generate with eager attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig.from_pretrained(llama_directory)
    config.vocab_size, config.eos_token_id, config.bos_token_id = tokenizer.get_vocab_size(), 1, None
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    prompt = "Open the"
    ids = torch.tensor([hf_tokenizer(prompt).input_ids])
    out = eager.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=1)
    expected = hf_tokenizer.decode(out[0], skip_special_tokens=True)
    assert run_cli(str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0") == [expected]


@pytest.mark.parametrize(
    "layout, extra, message",
    [
        ("no tokenizer", [], r"no tokenizer: .*tokenizer.json not found \(pass --tokenizer"),
        ("run without phase config", [], r"distilled has no config.json: write the phase model's TransformerConfig"),
        ("run without the phase", ["--phase", "baseline"], r"no phase 'baseline' \(--phase; it has \['distilled'\]\)"),
        ("too long", ["--max-new-tokens", "100"], r"exceeds the model's context, max_seq_len=64"),
        ("missing", [], r"is neither a file nor a directory"),
    ],
)
def test_cli_errors_name_what_is_wrong(tmp_path, tokenizer, cli_model, capsys, layout, extra, message):
    from tsa_fast.generate import main

    model = tmp_path / "model"
    if layout.startswith("run"):
        (model / "distilled").mkdir(parents=True)
        (model / "config.json").write_text('{"teachers": [], "student": {}}')
        torch.save(cli_model.state_dict(), model / "distilled" / "checkpoint.pt")
    elif layout != "missing":
        cli_model.save_pretrained(model)
    if layout == "too long":
        tokenizer.save(str(model / "tokenizer.json"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(model), "--prompt", "Return the", *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_streams_token_by_token(tmp_path, tokenizer, cli_model):
    from tsa_fast.generate import complete, load

    cli_model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load(str(tmp_path))

    class Recorder:
        def __init__(self):
            self.writes, self.flushes = [], 0

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            self.flushes += 1

    out, steps = Recorder(), []
    options = dict(max_new_tokens=12, temperature=0, streamer=steps.append)
    completion = complete(loaded, "Return the", dict(max_new_tokens=12, temperature=0), out=out)
    ids = cli_model.generate(torch.tensor([tokenizer.encode("Return the").ids]), eos_id=1, **options)
    assert "".join(out.writes) == "Return the" + completion + "\n"
    assert completion == tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)[len("Return the") :]
    assert len(out.writes) >= len(steps) > 4 and out.flushes >= len(steps)  # a write and a flush per token


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="no triton backend here")
def test_fused_attention_generates_the_tokens_of_pytorchs(monkeypatch):
    """Decoding through the Triton kernels (a query against strided cache views, left-padding key masks)
    gives PyTorch's SDPA's tokens."""
    model = copying_model("rotary")
    ids, mask = left_padded([random_ids(1, n)[0] for n in (4, 8)])
    monkeypatch.setenv("TSA_FAST_BACKEND", "torch")
    expected = model.generate(ids, 8, temperature=0, attention_mask=mask)
    monkeypatch.setenv("TSA_FAST_BACKEND", "triton")
    assert torch.equal(model.generate(ids, 8, temperature=0, attention_mask=mask), expected)
