"""The engine's seams (`tsa_fast.distill.protocols`): each implementation has every member of its protocol, with
the protocol's signature; and what the engine and the recipes load from a path is never unpickled: a teacher
checkpoint or a resume checkpoint holding a pickled object is refused, and the object's code does not run."""

import inspect
from pathlib import Path

import pytest
import torch

from tsa_fast.distill.checkpoints import load_weights_only
from tsa_fast.distill.config import LoggingConfig, LossConfig, TrainingConfig
from tsa_fast.distill.distiller import CHECKPOINT, Distiller, Phase, TorchOptimization
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.protocols import Model, ModelShape, Optimization, Runtime, TeacherSource
from tsa_fast.distill.teacher_cache import TopkTeacherCache
from tsa_fast.distill.teachers import Teachers
from tsa_fast.models import Transformer, TransformerConfig
from tsa_fast.recipes.runtime import LocalRuntime

CPU = torch.device("cpu")
CONFIG = TransformerConfig(vocab_size=61, max_seq_len=12, d_model=32, n_layers=2, n_heads=4)


def members(protocol: type) -> list[str]:
    """The protocol's own members: methods, properties and annotated attributes."""
    names = [name for name in vars(protocol) if not name.startswith("_")]
    return sorted(set(names) | set(getattr(protocol, "__annotations__", {})))


def assert_implements(cls: type, protocol: type) -> None:
    """Every member of `protocol` is on `cls`: a method with the same parameters (names, kinds, defaults), a
    property as a property; annotated attributes are checked on instances (`isinstance`)."""
    for name in members(protocol):
        wanted = inspect.getattr_static(protocol, name, None)
        if wanted is None:  # an annotated attribute
            continue
        have = inspect.getattr_static(cls, name, None)
        assert have is not None, f"{cls.__name__} has no {name}"
        if isinstance(wanted, property):
            assert isinstance(have, property), f"{cls.__name__}.{name} is not a property"
            continue
        params = lambda f: [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
        assert params(have) == params(wanted), f"{cls.__name__}.{name}{inspect.signature(have)}"


def test_native_model_and_engine_classes_implement_their_protocols(tmp_path):
    model = Transformer(CONFIG)
    assert_implements(Transformer, Model)
    assert isinstance(model, Model) and isinstance(model.config, ModelShape)
    optimization = TorchOptimization(model, TrainingConfig(), CPU, None)
    assert_implements(TorchOptimization, Optimization)
    assert isinstance(optimization, Optimization)
    teachers = Teachers([Transformer(CONFIG)], [1.0], "lm")
    split = {"input_ids": torch.randint(0, 61, (4, 12)), "labels": torch.randint(0, 61, (4, 12))}
    cache = TopkTeacherCache.build(
        teachers, split, tmp_path, temperature=1.0, top_k=4, fingerprint="f", batch_size=2, device=CPU, progress=False
    )
    for source in (teachers, cache):
        assert_implements(type(source), TeacherSource)
        assert isinstance(source, TeacherSource)
    assert_implements(LocalRuntime, Runtime)
    assert isinstance(LocalRuntime(), Runtime)


def test_the_teacher_cache_refuses_what_it_does_not_hold(tmp_path):
    teachers = Teachers([Transformer(CONFIG)], [1.0], "lm")
    split = {"input_ids": torch.randint(0, 61, (4, 12)), "labels": torch.randint(0, 61, (4, 12))}
    cache = TopkTeacherCache.build(
        teachers, split, tmp_path, temperature=1.0, top_k=4, fingerprint="f", batch_size=2, device=CPU, progress=False
    )
    batch = {**split, "index": torch.arange(2)}
    assert cache.targets(batch, 1.0, fused=True).topk[0].shape == (2, 12, 4)
    with pytest.raises(ValueError, match="hidden states"):
        cache.targets(batch, 1.0, hidden_states=True)


def test_hugging_face_model_implements_the_model_protocol():
    transformers = pytest.importorskip("transformers")
    hf = pytest.importorskip("tsa_fast.integrations.hf")  # transformers new enough
    from tsa_fast.recipes.sentence_embedding import EmbeddingTeacher

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    model = hf.HFModel(llama)
    assert_implements(hf.HFModel, Model)
    assert isinstance(model, Model) and isinstance(model.config, ModelShape)
    assert_implements(EmbeddingTeacher, TeacherSource)
    assert isinstance(EmbeddingTeacher(model), TeacherSource)


def test_deepspeed_classes_implement_their_protocols():
    deepspeed = pytest.importorskip("tsa_fast.integrations.deepspeed")
    assert_implements(deepspeed.DeepSpeedOptimization, Optimization)
    assert_implements(deepspeed.DeepSpeedRuntime, Runtime)


# --- nothing from a path is unpickled -------------------------------------------------------------------------


class Payload:
    """Unpickling it creates the file `marker` (what a malicious pickle could do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def poisoned(path: Path, marker: Path, **state) -> Path:
    torch.save({**state, "payload": Payload(marker)}, path)
    return path


def test_a_teacher_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = poisoned(tmp_path / "teacher.pt", marker, config=CONFIG.model_dump(), model=Transformer(CONFIG).state_dict())
    with pytest.raises(ValueError, match="teacher.pt: refused"):
        LocalRuntime().teacher(lambda: Transformer(CONFIG), path)
    assert not marker.exists()
    deepspeed = pytest.importorskip("tsa_fast.integrations.deepspeed")
    with pytest.raises(ValueError, match="teacher.pt: refused"):
        deepspeed.load_partitioned(Transformer(CONFIG), path)
    assert not marker.exists()


def test_a_resume_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    data = type("Data", (), {"task": "lm", "train": {}, "validation": {}})()
    training = TrainingConfig(steps=2, batch_size=2, warmup_steps=0)
    phase = Phase("p", tmp_path, training, 0, CPU, logging=LoggingConfig(progress=False, tensorboard=False))
    model = Transformer(CONFIG)
    distiller = Distiller(model, DistillationObjective(LossConfig(), "lm", CONFIG, None), data, phase)
    distiller.save_checkpoint()
    state = load_weights_only(tmp_path / CHECKPOINT)  # what the engine writes loads with weights_only
    assert state["step"] == 0 and "module" in state
    marker = tmp_path / "payload_ran"
    poisoned(tmp_path / CHECKPOINT, marker, **state)
    with pytest.raises(ValueError, match="checkpoint.pt: refused"):
        distiller.fit(resume=True)
    assert not marker.exists()
