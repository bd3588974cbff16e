"""Shared fixtures: a tiny random Llama (unit tests) and the embedded SmolLM2 (slow tests)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def make_hf_model(path: Path, model_type: str = "llama", tokenizer_from: Path | None = None, **overrides):
    """Save a tiny random HF decoder of ``model_type`` to ``path`` and return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    params.update(overrides)
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for f in tokenizer_from.glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, path / f.name)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model(path)
    return path


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from medusa.core.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_backend():
    from medusa.backend import TorchBackend

    return TorchBackend(dtype="float32", device="cpu")
