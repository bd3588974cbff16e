"""Export: vLLM's Medusa layout (names, shapes, config, and the same logits) and TensorRT-LLM's.

``VllmMedusa`` mirrors the parameter structure of vLLM's ``Medusa`` module
(vllm/model_executor/models/medusa.py: ``blocks[i].layers[j]`` = Linear(h, h, bias=medusa_fc_bias),
``x = x + SiLU(layer(x))``; ``lm_heads[i]`` = Linear(h, V) without bias), so a strict
``load_state_dict`` checks every name and shape, and its logits must equal our heads'.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from medusa.core.checkpoint import load_checkpoint, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.export import export
from medusa.heads import MedusaHeads

from .conftest import make_hf_model

HIDDEN, VOCAB = 64, 256  # the tiny model of conftest


class VllmResidualBlock(nn.Module):
    def __init__(self, hidden: int, layers: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden, bias=bias) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class VllmMedusa(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([VllmResidualBlock(cfg["hidden_size"], cfg["num_hidden_layers"],
                                                       cfg["medusa_fc_bias"]) for _ in range(cfg["num_heads"])])
        self.lm_heads = nn.ModuleList([nn.Linear(cfg["hidden_size"], cfg["truncated_vocab_size"], bias=False)
                                       for _ in range(cfg["num_heads"])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(block(x)) for block, head in zip(self.blocks, self.lm_heads)])


def _random_heads(tmp_path, shared: bool, base: str = "", layers: int = 2) -> tuple[MedusaHeads, MedusaConfig]:
    config = MedusaConfig(medusa_num_heads=3, medusa_num_layers=layers, shared_lm_head=shared,
                          base_model_name_or_path=base, tree="tree.json")
    torch.manual_seed(1)
    heads = MedusaHeads(config, HIDDEN, VOCAB)
    for p in heads.parameters():
        nn.init.normal_(p, std=0.05)
    save_checkpoint(tmp_path / "heads", config, heads.numpy_state())
    (tmp_path / "heads" / "tree.json").write_text("[[0], [0, 0]]")
    return heads.eval(), config


def _base_lm_head(model_dir) -> nn.Linear:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).get_output_embeddings()


@pytest.mark.parametrize("shared", [True, False])
def test_vllm_layout_and_logits(tmp_path, tiny_dir, shared):
    heads, config = _random_heads(tmp_path, shared)
    written = export(tmp_path / "heads", tmp_path / "vllm", "vllm", model=str(tiny_dir), dtype="float32")
    assert written.name == "model.safetensors"
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
    assert (cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (3, 2, HIDDEN)
    assert cfg["vocab_size"] == cfg["truncated_vocab_size"] == VOCAB
    assert cfg["medusa_fc_bias"] is True and cfg["original_lm_head"] is shared

    state = load_file(str(written))
    expected = {f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2) for p in ("weight", "bias")}
    expected |= {f"lm_heads.{i}.weight" for i in range(3)}
    assert set(state) == expected
    assert state["blocks.2.layers.1.weight"].shape == (HIDDEN, HIDDEN)
    assert state["blocks.2.layers.1.bias"].shape == (HIDDEN,)
    assert state["lm_heads.2.weight"].shape == (VOCAB, HIDDEN)

    vllm = VllmMedusa(cfg)
    vllm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    base = _base_lm_head(tiny_dir)
    hidden = torch.randn(5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(vllm(hidden), heads(hidden, base), rtol=1e-5, atol=1e-5)


def test_shared_heads_copy_the_tied_embedding(tmp_path):
    model_dir = tmp_path / "tied"
    hf = make_hf_model(model_dir, tie_word_embeddings=True)
    _random_heads(tmp_path, shared=True, base=str(model_dir), layers=1)
    written = export(tmp_path / "heads", tmp_path / "vllm", "vllm")  # --model from base_model_name_or_path
    state = load_file(str(written))
    assert state["lm_heads.0.weight"].dtype == np.float16  # the default export dtype
    embedding = hf.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(state["lm_heads.1.weight"], embedding, atol=1e-3)


def test_medusa_format_has_per_head_lm_heads(tmp_path, tiny_dir):
    heads, _ = _random_heads(tmp_path, shared=True, layers=1)
    written = export(tmp_path / "heads", tmp_path / "trt", "medusa", model=str(tiny_dir), dtype="float32")
    assert written.name == "medusa_lm_head.safetensors"
    config, state = load_checkpoint(tmp_path / "trt")
    assert not config.shared_lm_head and config.medusa_num_heads == 3 and config.medusa_num_layers == 1
    assert state["2.1.weight"].shape == (VOCAB, HIDDEN)  # TensorRT-LLM reads {head}.{num_layers}.weight
    assert (tmp_path / "trt" / "tree.json").is_file()
    again = MedusaHeads(config, HIDDEN, VOCAB)
    again.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    hidden = torch.randn(4, HIDDEN)
    base = _base_lm_head(tiny_dir)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(hidden, base), heads(hidden, base), rtol=1e-5, atol=1e-5)


def test_shared_heads_without_a_base_model_fail_clearly(tmp_path):
    _random_heads(tmp_path, shared=True)
    with pytest.raises(ValueError, match="pass --model"):
        export(tmp_path / "heads", tmp_path / "out", "vllm")
    run = subprocess.run([sys.executable, "-m", "medusa.export", "--format", "vllm", "--heads", str(tmp_path / "heads"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["ERROR medusa.export: these heads share the base model's lm_head: "
                                               "pass --model so it can be copied into each head"]


def test_heads_of_another_model_are_refused(tmp_path):
    other = tmp_path / "other"
    make_hf_model(other, hidden_size=32, intermediate_size=64)
    _random_heads(tmp_path, shared=True)
    with pytest.raises(ValueError, match="belong to another model"):
        export(tmp_path / "heads", tmp_path / "out", "vllm", model=str(other))
