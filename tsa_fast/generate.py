"""Complete prompts with a model, printing each completion as it is generated.

    python -m tsa_fast.generate MODEL --prompt "def fib(n):" [--prompt ...] [--max-new-tokens 64]
        [--temperature 1.0] [--top-k K] [--top-p P] [--seed 0] [--tokenizer tokenizer.json] [--phase distilled]

MODEL is one of:
- a Hugging Face model directory (a config.json with a model_type): `AutoModelForCausalLM` and `AutoTokenizer`
  from it, generating through `HFModel.generate` (its own generate, attention "tsa_fast");
- a Transformer directory: config.json (a `TransformerConfig`), model.pt or checkpoint.pt (see
  `Transformer.from_pretrained`) and tokenizer.json (a `tokenizers` file; or --tokenizer);
- a run directory of the engine (its config.json is the recipe's): the phase --phase (default distilled), a
  Transformer directory as above, the tokenizer.json there or in the run directory (or --tokenizer);
- a checkpoint file (.pt: a state dict, a cached teacher {"config", "model"} or a phase checkpoint), with the
  config it holds or the config.json beside it, and the tokenizer.json beside it or --tokenizer.
Every file is read with torch.load(weights_only=True) or as JSON. Each prompt is completed in turn (seeded by
--seed), its text and then the completion streamed to stdout token by token, until --max-new-tokens or the
tokenizer's end-of-sequence token (<eos> for the engine's tokenizers). Bad arguments exit with status 2 and
a message naming them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tsa_fast.models import Transformer, TransformerConfig, checkpoint_state_dict

TOKENIZER_FILE = "tokenizer.json"
ENGINE_EOS = "<eos>"  # the end-of-sequence token of the engine's tokenizers


@dataclass
class LoadedModel:
    """A loaded model and its tokenizer, behind one interface: `encode` a prompt to ids, `decode` ids to
    text (special tokens dropped), `generate` as `Transformer.generate`, `eos_id` (None: none)."""

    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int | None
    description: str


def load(model: str, tokenizer: str | None = None, phase: str = "distilled", device: str = "cpu") -> LoadedModel:
    """The model at `model` (a path, see the module docstring) on `device`. Raises FileNotFoundError or
    ValueError naming what is missing or wrong."""
    path = Path(model)
    if path.is_file():
        return _native(_checkpoint_model(path), _tokenizer_file(tokenizer, path.parent), device, str(path))
    if not path.is_dir():
        raise FileNotFoundError(f"MODEL {model} is neither a file nor a directory")
    config = _json(path / "config.json") if (path / "config.json").is_file() else {}
    if "model_type" in config:
        return _hugging_face(path, device)
    if "teachers" in config or "student" in config:  # a run directory: the recipe's config
        phase_dir = path / phase
        if not phase_dir.is_dir():
            phases = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise FileNotFoundError(f"run directory {path} has no phase {phase!r} (--phase; it has {phases})")
        if not (phase_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{phase_dir} has no config.json: write the phase model's TransformerConfig there"
                f" (model.config.model_dump_json()), and its tokenizer to {path / TOKENIZER_FILE} or pass --tokenizer"
            )
        found = tokenizer or next(
            (str(d / TOKENIZER_FILE) for d in (phase_dir, path) if (d / TOKENIZER_FILE).is_file()), None
        )
        return _native(
            Transformer.from_pretrained(phase_dir), _tokenizer_file(found, phase_dir), device, str(phase_dir)
        )
    return _native(Transformer.from_pretrained(path), _tokenizer_file(tokenizer, path), device, str(path))


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def _checkpoint_model(path: Path) -> Transformer:
    """The Transformer of a checkpoint file, configured by the config it holds or the config.json beside it."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("config"), dict):
        config = TransformerConfig.model_validate(loaded["config"])
    elif (path.parent / "config.json").is_file():
        config = TransformerConfig.model_validate(_json(path.parent / "config.json"))
    else:
        raise FileNotFoundError(f"{path} holds no model config and there is no config.json beside it")
    model = Transformer(config)
    model.load_state_dict(checkpoint_state_dict(loaded, str(path)))
    return model.eval()


def _tokenizer_file(given: str | None, directory: Path):
    """The `tokenizers.Tokenizer` of `given`, or else of directory/tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(given) if given else directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer: {path} not found (pass --tokenizer PATH, a tokenizers JSON file)")
    return Tokenizer.from_file(str(path))


def _native(model: Transformer, tokenizer, device: str, description: str) -> LoadedModel:
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's"
            f" vocab_size={model.config.vocab_size}"
        )
    return LoadedModel(
        model=model.to(device),
        encode=lambda text: tokenizer.encode(text).ids,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_id=tokenizer.token_to_id(ENGINE_EOS),
        description=f"{description} (Transformer, {model.config.n_layers} blocks, d_model={model.config.d_model})",
    )


def _hugging_face(path: Path, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsa_fast.integrations.hf import HFModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = HFModel(AutoModelForCausalLM.from_pretrained(path)).to(device)
    return LoadedModel(
        model=model,
        encode=lambda text: tokenizer(text).input_ids,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_id=tokenizer.eos_token_id,
        description=f"{path} ({type(model.model).__name__}, attention tsa_fast)",
    )


class TextStream:
    """Writes a prompt and its completion to `out` as the completion's tokens come: the prompt's text first,
    then the text of prompt + tokens so far less what is already written, held back while it ends in an
    incomplete character (U+FFFD)."""

    def __init__(self, loaded: LoadedModel, prompt_ids: list[int], out):
        self.loaded, self.prompt_ids, self.out = loaded, prompt_ids, out
        self.prompt_text = loaded.decode(prompt_ids)
        self.new_ids: list[int] = []
        self.written: int | None = None  # characters of the completion written; None: not even the prompt

    def __call__(self, tokens: Tensor) -> None:
        token = int(tokens[0])
        if token != self.loaded.eos_id:
            self.new_ids.append(token)
        text = self.completion()
        if not text.endswith("\ufffd"):
            self.write(text)

    def completion(self) -> str:
        full = self.loaded.decode(self.prompt_ids + self.new_ids)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text) :]
        return self.loaded.decode(self.new_ids)

    def write(self, text: str) -> None:
        if self.written is None:
            self.out.write(self.prompt_text)
            self.written = 0
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = len(text)

    def finish(self) -> None:
        self.write(self.completion() + "\n")


def complete(loaded: LoadedModel, prompt: str, options: dict, out=None) -> str:
    """Generate the completion of `prompt` (options: `Transformer.generate`'s), streaming the prompt and the
    completion to `out` (default: stdout); returns the completion's text."""
    prompt_ids = loaded.encode(prompt)
    if not prompt_ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no token")
    stream = TextStream(loaded, prompt_ids, out or sys.stdout)
    device = next(loaded.model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)
    loaded.model.generate(ids, eos_id=loaded.eos_id, streamer=stream, **options)
    stream.finish()
    return stream.completion()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsa_fast.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a run directory, a Transformer directory, a checkpoint or an HF directory"
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt to complete; repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument(
        "--top-p", type=float, help="nucleus sampling: among the most likely tokens holding probability P"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--tokenizer", help="a tokenizers JSON file, for a native model without tokenizer.json")
    parser.add_argument("--phase", default="distilled", help="the phase of a run directory (default distilled)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    args = parser.parse_args(argv)
    try:
        loaded = load(args.model, args.tokenizer, args.phase, args.device)
        seeded = torch.Generator(args.device).manual_seed(args.seed)
        options = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=seeded,
        )
        print(f"# {loaded.description}", file=sys.stderr)
        for prompt in args.prompt:
            complete(loaded, prompt, options)
    except (FileNotFoundError, ValueError, TypeError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
