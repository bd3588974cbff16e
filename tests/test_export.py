"""Export: vLLM's Medusa layout (names, shapes, config, and the same logits) and TensorRT-LLM's.

``VllmMedusa`` mirrors the parameter structure of vLLM's ``Medusa`` module
(vllm/model_executor/models/medusa.py: ``blocks[i].layers[j]`` = Linear(h, h, bias=medusa_fc_bias),
``x = x + SiLU(layer(x))``; ``lm_heads[i]`` = Linear(h, K) without bias; with a truncated vocabulary
the ``token_map`` tensor scatters the K logits back to vocabulary ids, -inf elsewhere), so a strict
``load_state_dict`` checks every name and shape, and its logits must equal our heads'.  Every
published input layout round-trips: FasterDecoding heads (.pt / .safetensors), ours with a token map
and trees, a Medusa-2 model directory.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from medusa.core.checkpoint import load_checkpoint, medusa2_heads, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.core.token_map import load_token_map, read_token_map
from medusa.export import export
from medusa.heads import MedusaHeads

from .conftest import make_hf_model
from .test_checkpoint_formats import make_medusa2, upstream_heads, write_medusa1

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

        self.vocab_size = cfg["vocab_size"]
        self.token_map = None

    def load(self, state: dict) -> None:
        """vLLM's load_weights: ``token_map`` is kept only for a truncated vocabulary; the rest strictly."""
        state = {k: torch.from_numpy(v) for k, v in state.items()}
        token_map = state.pop("token_map", None)
        if self.lm_heads[0].out_features < self.vocab_size:
            assert token_map is not None, "a truncated vocabulary needs a token_map tensor"
            self.token_map = token_map
        self.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(block(x)) for block, head in zip(self.blocks, self.lm_heads)])
        if self.token_map is None:
            return logits
        full = torch.full((*logits.shape[:-1], self.vocab_size), -torch.inf)
        full[..., self.token_map] = logits
        return full


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
    vllm.load(state)
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


# --- round trips of every published layout ----------------------------------------------------


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("source", ["pt", "safetensors"])
@pytest.mark.parametrize("weights_format", ["safetensors", "pt"])
def test_fasterdecoding_heads_round_trip(tmp_path, caplog, source, weights_format):
    expected = write_medusa1(tmp_path / "vicuna-heads", upstream_heads(5), source)  # config.json says 2
    written = export(tmp_path / "vicuna-heads", tmp_path / "out", "medusa", dtype="float32",
                     weights_format=weights_format)
    assert written.name == f"medusa_lm_head.{weights_format}"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["medusa_num_heads"] == 5
    caplog.clear()
    config, state = load_checkpoint(tmp_path / "out")
    assert (config.medusa_num_heads, config.base_model_name_or_path) == (5, "lmsys/vicuna-7b-v1.3")
    assert not _warnings(caplog)  # the export's config now tells the truth
    assert state.keys() == expected.keys() and all(np.array_equal(state[k], expected[k]) for k in state)

    export(tmp_path / "vicuna-heads", tmp_path / "vllm", "vllm", dtype="float32")
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert (cfg["num_heads"], cfg["truncated_vocab_size"], cfg["original_lm_head"]) == (5, VOCAB, False)
    VllmMedusa(cfg).load(load_file(str(tmp_path / "vllm" / "model.safetensors")))


def test_medusa2_directory_round_trip(tmp_path):
    make_medusa2(tmp_path / "medusa2", "sharded")
    config, state = medusa2_heads(tmp_path / "medusa2")
    export(tmp_path / "medusa2", tmp_path / "heads", "medusa", dtype="float32")
    again, exported = load_checkpoint(tmp_path / "heads")
    assert again == config and again.base_model_name_or_path == str(tmp_path / "medusa2")
    assert all(np.array_equal(state[k], exported[k]) for k in state)

    written = export(tmp_path / "medusa2", tmp_path / "vllm", "vllm", dtype="float32")
    vllm = VllmMedusa(json.loads((tmp_path / "vllm" / "config.json").read_text()))
    vllm.load(load_file(str(written)))
    heads = MedusaHeads(config, HIDDEN, VOCAB)
    heads.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    hidden = torch.randn(4, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(vllm(hidden), heads.eval()(hidden, None), rtol=1e-5, atol=1e-5)


def _heads_with_token_map(tmp_path, ids: list[int]) -> tuple[MedusaHeads, MedusaConfig]:
    """Heads laid out as ours ship: shared lm_head, token map, tree.json and a per-backend tree."""
    heads, _ = _random_heads(tmp_path, shared=True, layers=1)
    raw = json.loads((tmp_path / "heads" / "config.json").read_text())
    (tmp_path / "heads" / "config.json").write_text(json.dumps(dict(raw, token_map="token_map.json")))
    (tmp_path / "heads" / "token_map.json").write_text(json.dumps({"ids": ids, "coverage": 0.9}))
    (tmp_path / "heads" / "tree-jittor.json").write_text("[[0]]")
    return heads, load_checkpoint(tmp_path / "heads")[0]


def test_token_map_survives_the_medusa_format_and_reaches_vllm(tmp_path, tiny_dir, caplog):
    ids = list(range(3, VOCAB, 5))
    heads, config = _heads_with_token_map(tmp_path, ids)
    export(tmp_path / "heads", tmp_path / "trt", "medusa", model=str(tiny_dir), dtype="float32")
    assert {f.name for f in (tmp_path / "trt").iterdir()} >= {"token_map.json", "tree.json", "tree-jittor.json"}
    assert any("full vocabulary" in w for w in _warnings(caplog))
    exported, _ = load_checkpoint(tmp_path / "trt")  # our own loader accepts the export
    assert not exported.shared_lm_head and exported.tree == "tree.json"
    assert load_token_map(tmp_path / "trt", exported) is None  # own lm_heads propose over the full vocabulary
    assert read_token_map(tmp_path / "trt", exported).tolist() == ids

    for source in ("heads", "trt"):  # directly, and through the medusa export
        written = export(tmp_path / source, tmp_path / f"vllm-{source}", "vllm", model=str(tiny_dir), dtype="float32")
        cfg = json.loads((tmp_path / f"vllm-{source}" / "config.json").read_text())
        assert (cfg["vocab_size"], cfg["truncated_vocab_size"]) == (VOCAB, len(ids))
        state = load_file(str(written))
        assert state["token_map"].dtype == np.int64 and state["token_map"].tolist() == ids
        assert state["lm_heads.0.weight"].shape == (len(ids), HIDDEN)
        vllm = VllmMedusa(cfg)
        vllm.load(state)
        hidden = torch.randn(4, HIDDEN)
        with torch.no_grad():
            got, want = vllm(hidden), heads(hidden, _base_lm_head(tiny_dir))
        torch.testing.assert_close(got[..., ids], want[..., ids], rtol=1e-5, atol=1e-5)
        outside = np.setdiff1d(np.arange(VOCAB), ids)
        assert torch.isneginf(got[..., outside]).all()


@pytest.mark.slow
def test_shipped_heads_export_and_load_back(tmp_path, smol_dir):
    """The shipped heads at full size.  The default ones are Hydra heads, which neither vLLM nor
    TensorRT-LLM runs: refused in one line, nothing written.  The Medusa-1 heads shipped beside them
    export with their token map and trees, and load back."""
    import medusa
    from medusa.core.checkpoint import CheckpointError
    from medusa.core.models import shipped_heads

    hydra = shipped_heads("smollm2-135m")
    assert load_checkpoint(hydra)[0].head_type == "hydra"
    with pytest.raises(CheckpointError, match="no vLLM or TensorRT-LLM"):
        export(hydra, tmp_path / "refused", "medusa")
    assert not (tmp_path / "refused").exists()
    shipped = Path(medusa.__file__).parent / "shipped" / "smollm2-135m-medusa1"
    config, _ = load_checkpoint(shipped)
    assert config.head_type == "medusa"
    export(shipped, tmp_path / "trt", "medusa")
    exported, state = load_checkpoint(tmp_path / "trt")
    assert exported.medusa_num_heads == config.medusa_num_heads and not exported.shared_lm_head
    assert state["0.1.weight"].shape[0] == 49152
    for name in ("tree.json", "tree-jittor.json", "token_map.json"):
        assert (tmp_path / "trt" / name).read_bytes() == (shipped / name).read_bytes()
    load_token_map(tmp_path / "trt", exported)  # the old export named a token map it had not copied
    export(tmp_path / "trt", tmp_path / "vllm", "vllm")
    ids = read_token_map(shipped, config)
    assert load_file(str(tmp_path / "vllm" / "model.safetensors"))["token_map"].tolist() == ids.tolist()
