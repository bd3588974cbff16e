"""Medusa checkpoints exactly as they are published (issue 12): FasterDecoding Medusa-1 heads whose
config.json miscounts them, and Medusa-2 model directories holding backbone and heads together.

Fixtures are built as upstream builds them (FasterDecoding/Medusa ``medusa_model.py``): an
``nn.ModuleList`` of ``nn.Sequential(ResBlock * L, Linear(h, V, bias=False))`` saved with
``torch.save(state_dict)`` or safetensors, and for Medusa-2 the same module registered as
``medusa_head`` of the model, so its tensors sit in the model's shards as ``medusa_head.*``.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa.core.checkpoint import (CheckpointError, check_base_model, describe_heads, is_medusa2, load_checkpoint,
                                    medusa2_heads, save_checkpoint)
from medusa.core.config import MedusaConfig
from medusa.core.weights import read_hf_numpy, weight_files
from medusa.heads import heads_from_state

from .conftest import make_hf_model

HIDDEN, VOCAB = 64, 256  # the tiny model of conftest
VICUNA_CONFIG = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}


class UpstreamResBlock(nn.Module):
    """FasterDecoding's ResBlock: ``x + SiLU(linear(x))``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def upstream_heads(num_heads: int = 5, num_layers: int = 1) -> nn.ModuleList:
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Sequential(*[UpstreamResBlock(HIDDEN) for _ in range(num_layers)],
                                         nn.Linear(HIDDEN, VOCAB, bias=False)) for _ in range(num_heads)])
    for p in heads.parameters():
        nn.init.normal_(p, std=0.05)
    return heads.eval()


def write_medusa1(path, heads: nn.ModuleList, fmt: str = "pt", dtype=torch.float16, config=VICUNA_CONFIG):
    """A FasterDecoding heads directory: medusa_lm_head.pt (or .safetensors) + config.json."""
    path.mkdir()
    state = {k: v.to(dtype).contiguous() for k, v in heads.state_dict().items()}
    if fmt == "pt":
        torch.save(state, path / "medusa_lm_head.pt")
    else:
        save_file(state, str(path / "medusa_lm_head.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return {k: v.float().numpy() for k, v in state.items()}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "medusa.core.checkpoint" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("fmt,dtype", [("pt", torch.float16), ("safetensors", torch.float16),
                                       ("safetensors", torch.bfloat16)])
def test_fasterdecoding_heads_load_with_the_count_of_their_weights(tmp_path, caplog, fmt, dtype):
    expected = write_medusa1(tmp_path / "heads", upstream_heads(5), fmt, dtype)
    config, state = load_checkpoint(tmp_path / "heads")  # config.json says 2; the old loader refused
    assert (config.medusa_num_heads, config.medusa_num_layers, config.shared_lm_head) == (5, 1, False)
    assert config.base_model_name_or_path == "lmsys/vicuna-7b-v1.3"
    (warning,) = warnings_of(caplog)
    assert "medusa_num_heads=2" in warning and "5 heads" in warning
    assert state.keys() == expected.keys() and all(np.array_equal(state[k], expected[k]) for k in state)
    heads = heads_from_state(config, state, HIDDEN, VOCAB, torch.float32, "cpu")
    assert len(heads) == 5


def test_layer_count_and_layout_disagreements_warn_once_each(tmp_path, caplog):
    write_medusa1(tmp_path / "heads", upstream_heads(3, num_layers=1), "safetensors", torch.float32,
                  config={"medusa_num_heads": 3, "medusa_num_layers": 2, "shared_lm_head": True})
    config, _ = load_checkpoint(tmp_path / "heads")
    assert (config.medusa_num_heads, config.medusa_num_layers, config.shared_lm_head) == (3, 1, False)
    layers, layout = warnings_of(caplog)
    assert "medusa_num_layers=2" in layers and "1 layers" in layers and "medusa_num_heads" not in layers
    assert "shared_lm_head=True" in layout and "per-head lm_heads" in layout


def test_heads_without_config_take_everything_from_the_weights(tmp_path, caplog):
    write_medusa1(tmp_path / "heads", upstream_heads(4, num_layers=2), "pt", config=None)
    config, _ = load_checkpoint(tmp_path / "heads")
    assert describe_heads(config) == {"num_heads": 4, "num_layers": 2, "head_type": "medusa", "shared_lm_head": False}
    assert config.base_model_name_or_path == "" and not warnings_of(caplog)


def test_head_type_is_written_read_back_and_unknown_types_are_refused(tmp_path):
    state = {k: v.numpy() for k, v in upstream_heads(2).state_dict().items()}
    save_checkpoint(tmp_path, MedusaConfig(2, 1), state)
    assert json.loads((tmp_path / "config.json").read_text())["head_type"] == "medusa"
    assert load_checkpoint(tmp_path)[0].head_type == "medusa"
    (tmp_path / "config.json").write_text(json.dumps({"head_type": "eagle"}))
    with pytest.raises(CheckpointError, match="unknown head_type 'eagle'"):
        load_checkpoint(tmp_path)


def test_base_model_disagreement_is_a_warning(tmp_path, caplog):
    config = MedusaConfig(5, 1, base_model_name_or_path="lmsys/vicuna-7b-v1.3")
    snapshot = tmp_path / "hub" / "models--lmsys--vicuna-7b-v1.3" / "snapshots" / "abc"
    assert check_base_model(config, "lmsys/vicuna-7b-v1.3")
    assert check_base_model(config, str(snapshot), snapshot)
    assert check_base_model(config, "/models/vicuna-7b-v1.3/")
    assert not warnings_of(caplog)
    assert not check_base_model(config, "/models/llama-2-7b", tmp_path / "llama-2-7b")
    (warning,) = warnings_of(caplog)
    assert "lmsys/vicuna-7b-v1.3" in warning and "/models/llama-2-7b" in warning


# --- Medusa-2: one directory, backbone + heads -------------------------------------------------


def make_medusa2(path, layout: str, num_heads: int = 3, config: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny random Llama saved by transformers with ``medusa_head.*`` added to its weights, as
    Medusa-2 training saves it; ``layout``: single safetensors, sharded safetensors, or a .bin."""
    hf = make_hf_model(path)
    extra = {f"medusa_head.{k}": v.contiguous() for k, v in upstream_heads(num_heads).state_dict().items()}
    if layout == "single":
        save_file(dict(load_file(str(path / "model.safetensors")), **extra), str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    elif layout == "sharded":
        (path / "model.safetensors").unlink()
        hf.save_pretrained(path, max_shard_size="200KB")
        index = json.loads((path / "model.safetensors.index.json").read_text())
        save_file(extra, str(path / "model-medusa-heads.safetensors"), metadata={"format": "pt"})
        index["weight_map"].update({k: "model-medusa-heads.safetensors" for k in extra})
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (path / "model.safetensors").unlink()
        torch.save(dict(hf.state_dict(), **extra), path / "pytorch_model.bin")
    raw = json.loads((path / "config.json").read_text())
    raw.update(config if config is not None else {"medusa_num_heads": num_heads, "medusa_num_layers": 1})
    (path / "config.json").write_text(json.dumps(raw))
    return {k[len("medusa_head."):]: v.numpy() for k, v in extra.items()}


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_medusa2_directory_gives_heads_and_a_backbone_that_ignores_them(tmp_path, caplog, layout):
    from transformers import AutoModelForCausalLM

    from medusa.llama import KVCache, load_llama

    expected = make_medusa2(tmp_path, layout)
    if layout == "sharded":
        assert len(weight_files(tmp_path)) > 2
    assert is_medusa2(tmp_path)
    config, state = medusa2_heads(tmp_path)
    assert describe_heads(config) == {"num_heads": 3, "num_layers": 1, "head_type": "medusa", "shared_lm_head": False}
    assert config.base_model_name_or_path == str(tmp_path) and not warnings_of(caplog)
    assert state.keys() == expected.keys() and all(np.array_equal(state[k], expected[k]) for k in state)
    assert load_checkpoint(tmp_path)[0] == config  # --medusa-heads may name the Medusa-2 directory too

    assert not any(k.startswith("medusa_head.") for k in read_hf_numpy(tmp_path))  # the Jittor loader's reader
    ours = load_llama(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = KVCache(ours.args, 32, torch.float32, "cpu")
        mask = torch.ones(12, 12, dtype=torch.bool).tril()
        got = ours.logits(ours(ids, torch.arange(12), mask, cache))[0]
        torch.testing.assert_close(got, hf(ids).logits[0], rtol=1e-4, atol=1e-4)


def test_medusa2_heads_are_found_without_reading_the_backbone(tmp_path):
    make_medusa2(tmp_path, "sharded")
    for shard in {f for f in weight_files(tmp_path) if "medusa" not in f.name}:
        shard.write_bytes(b"not read")  # a backbone shard opened for the heads would fail to parse
    config, state = medusa2_heads(tmp_path)
    assert config.medusa_num_heads == 3 and len(state) == 3 * 3


@pytest.mark.parametrize("where", ["nested", "separate"])
def test_medusa2_config_nested_or_separate_is_read(tmp_path, caplog, where):
    if where == "nested":
        make_medusa2(tmp_path, "single", config={"medusa": {"num_heads": 2, "num_layers": 1}})
    else:
        make_medusa2(tmp_path, "single", config={})
        (tmp_path / "medusa_config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    assert medusa2_heads(tmp_path)[0].medusa_num_heads == 3
    (warning,) = warnings_of(caplog)
    assert "medusa_num_heads=2" in warning and "3 heads" in warning


def test_plain_models_and_medusa1_heads_are_not_medusa2(tmp_path, tiny_dir):
    assert not is_medusa2(tiny_dir) and medusa2_heads(tiny_dir) is None
    write_medusa1(tmp_path / "heads", upstream_heads(2))
    assert not is_medusa2(tmp_path / "heads") and medusa2_heads(tmp_path / "heads") is None
    # unindexed shards beside a Medusa-1 heads file: the heads file is not a backbone shard
    unindexed = tmp_path / "unindexed"
    unindexed.mkdir()
    save_file({"x": torch.zeros(1)}, str(unindexed / "model-a.safetensors"))
    save_file({"0.0.weight": torch.zeros(1)}, str(unindexed / "medusa_lm_head.safetensors"))
    assert [f.name for f in weight_files(unindexed)] == ["model-a.safetensors"]
