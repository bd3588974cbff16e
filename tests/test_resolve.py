"""``--model`` / ``--medusa-heads`` as a new user gives them: every model form, every family, the
published head layouts, through every backend.  Fixtures are built here, never downloaded."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from medusa.core.backends import load_backend
from medusa.core.checkpoint import CheckpointError
from medusa.core.config import GenerationConfig
from medusa.core.models import ModelError, embedded_gguf, EMBEDDED, DEFAULT_MODEL, resolve_model
from medusa.core.resolve import resolve

from .conftest import make_hf_model

FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-bias": ("qwen2", {}),
    "llama3-rope-scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
}
PROMPT = [3, 17, 101, 45, 9, 200, 12, 77]
GREEDY = GenerationConfig(max_new_tokens=64)


@pytest.fixture(scope="module")
def tokenizer_files(smol_dir) -> Path:
    return smol_dir  # any real tokenizer: these tests drive the engine with token ids


def tiny_model(path: Path, family: str, tokenizer_from: Path) -> Path:
    model_type, overrides = FAMILIES[family]
    make_hf_model(path, model_type, tokenizer_from=tokenizer_from, **overrides)
    return path


def hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """A Hugging Face hub cache holding ``repo_id``: an old, broken snapshot and the one refs/main names."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)  # stale: must not be picked
    shutil.copytree(files, repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    return root


def greedy_pair(backend) -> tuple[list[int], list[int], int]:
    base = [t for s in backend.generate(PROMPT, GREEDY.with_(medusa=False)) for t in s.tokens]
    steps = list(backend.generate(PROMPT, GREEDY))
    return base, [t for s in steps for t in s.tokens], len(steps)


def faster_decoding_heads(path: Path, model_dir: Path, num_heads: int = 5, fmt: str = "pt",
                          config_heads: int | None = 2) -> Path:
    """Heads as FasterDecoding publishes them: ``medusa_lm_head.pt`` of ``num_heads`` heads (ResBlock
    + own vocabulary projection), and a config.json that says ``medusa_num_heads: 2`` (upstream's
    published configs do; the weights hold 5).  Each head starts as the base model's lm_head with a
    small ResBlock, so its proposals are often the base model's own and get accepted."""
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    h = lm_head.shape[1]
    g = torch.Generator().manual_seed(7)
    state = {}
    for i in range(num_heads):
        state[f"{i}.0.linear.weight"] = torch.randn(h, h, generator=g) * 1e-3
        state[f"{i}.0.linear.bias"] = torch.zeros(h)
        state[f"{i}.1.weight"] = lm_head.clone()
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save(state, path / "medusa_lm_head.pt")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path / "medusa_lm_head.safetensors"))
    if config_heads is not None:
        (path / "config.json").write_text(json.dumps({
            "medusa_num_heads": config_heads, "medusa_num_layers": 1,
            "base_model_name_or_path": str(model_dir), "transformers_version": "4.29.2"}))
    return path


def medusa2_dir(path: Path, tokenizer_from: Path, num_heads: int = 3) -> Path:
    """A Medusa-2 checkpoint: one directory, backbone + ``medusa_head.{i}.{j}.*`` in its safetensors."""
    from safetensors.torch import load_file, save_file

    tiny_model(path, "llama", tokenizer_from)
    weights = load_file(str(path / "model.safetensors"))
    h = weights["lm_head.weight"].shape[1]
    for i in range(num_heads):
        weights[f"medusa_head.{i}.0.linear.weight"] = torch.zeros(h, h)
        weights[f"medusa_head.{i}.0.linear.bias"] = torch.zeros(h)
        weights[f"medusa_head.{i}.1.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(medusa_num_heads=num_heads, medusa_num_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------- model forms


def test_model_forms_resolve_to_the_same_directory(tmp_path, monkeypatch, tokenizer_files):
    model = tiny_model(tmp_path / "models" / "tiny", "llama", tokenizer_files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "org/tiny", model)))
    assert resolve_model(str(model)) == model
    assert resolve_model("models/tiny") == model
    assert resolve_model("./models/tiny") == model
    from_hub = resolve_model("org/tiny")
    assert from_hub.name == "b" * 40 and (from_hub / "config.json").is_file()


def test_missing_model_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model("lmsys/vicuna-7b-v1.3")
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_a_gguf_file_resolves_to_its_converted_directory(smol_dir):
    gguf = embedded_gguf(EMBEDDED[DEFAULT_MODEL])
    assert resolve_model(str(gguf)) == resolve_model(DEFAULT_MODEL) == smol_dir


@pytest.mark.parametrize("backend", ["torch", "hybrid", "jittor"])
def test_a_model_directory_without_heads_works_on_every_backend(tmp_path, tokenizer_files, backend, caplog):
    """The reported bug: an absolute model path was taken for the heads directory."""
    model = tiny_model(tmp_path / "tiny", "llama", tokenizer_files)
    with caplog.at_level(logging.WARNING):
        b = load_backend(backend, model=str(model), device="cpu")
    assert b.describe()["heads"] == "fresh"
    assert sum("fresh (untrained) heads" in r.getMessage() for r in caplog.records) == 1
    base, medusa, _ = greedy_pair(b)
    assert medusa == base


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("form", ["absolute", "relative", "hub-id"])
def test_each_family_by_each_form_is_lossless(tmp_path, monkeypatch, tokenizer_files, family, form):
    model = tiny_model(tmp_path / "m" / family, family, tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model, num_heads=3, fmt="safetensors", config_heads=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", f"org/{family}", model)))
    name = {"absolute": str(model), "relative": f"m/{family}", "hub-id": f"org/{family}"}[form]
    b = load_backend("torch", model=name, heads=str(heads), tree="mc_sim_7b_63", device="cpu")
    base, medusa, steps = greedy_pair(b)
    assert medusa == base
    assert steps < len(medusa), "heads that copy the base lm_head must get some tokens accepted"


# ----------------------------------------------------------------------------- heads as published


def test_faster_decoding_heads_load_with_the_count_of_their_weights(tmp_path, tokenizer_files, caplog):
    model = tiny_model(tmp_path / "vicuna-like", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "medusa-vicuna-like", model)
    with caplog.at_level(logging.WARNING):
        run = resolve(str(model), str(heads))
    assert run.heads_config.medusa_num_heads == 5 and not run.heads_config.shared_lm_head
    assert any("2" in r.getMessage() and "5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", ["torch", "hybrid", "jittor"])
def test_faster_decoding_heads_are_lossless_on_every_backend(tmp_path, tokenizer_files, backend):
    model = tiny_model(tmp_path / "vicuna-like", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "medusa-vicuna-like", model)
    b = load_backend(backend, model=str(model), heads=str(heads), tree="mc_sim_7b_63", device="cpu")
    info = b.describe()
    assert (info["num_heads"], info["num_layers"], info["head_type"]) == (5, 1, "medusa")
    base, medusa, steps = greedy_pair(b)
    assert medusa == base and steps < len(medusa)


def test_heads_name_their_base_model_when_model_is_left_out(tmp_path, tokenizer_files):
    model = tiny_model(tmp_path / "base", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model)
    assert resolve(None, str(heads)).model_dir == model


def test_heads_by_hub_id_from_the_cache(tmp_path, monkeypatch, tokenizer_files):
    model = tiny_model(tmp_path / "base", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "FasterDecoding/medusa-tiny", heads)))
    run = resolve(str(model), "FasterDecoding/medusa-tiny")
    assert run.heads_source == "given:FasterDecoding/medusa-tiny" and run.heads_config.medusa_num_heads == 5


def test_a_medusa2_directory_given_as_heads_is_also_the_model(tmp_path, tokenizer_files):
    model = medusa2_dir(tmp_path / "medusa2-tiny", tokenizer_files)
    run = resolve(None, str(model))
    assert run.model_dir == model and run.heads_config.medusa_num_heads == 3


@pytest.mark.parametrize("config", ["{bad", "[1]"])
def test_a_broken_heads_config_is_one_clear_error(tmp_path, tokenizer_files, config):
    model = tiny_model(tmp_path / "base", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model)
    (heads / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="config.json"):
        resolve(None, str(heads))


def test_heads_for_another_base_model_warn_once(tmp_path, tokenizer_files, caplog):
    model = tiny_model(tmp_path / "llama-2-tiny", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model)
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps(dict(config, base_model_name_or_path="lmsys/vicuna-7b-v1.3")))
    with caplog.at_level(logging.WARNING):
        resolve(str(model), str(heads))
    assert sum("trained for lmsys/vicuna-7b-v1.3" in r.getMessage() for r in caplog.records) == 1


def test_missing_heads_directory_is_one_clear_error(tmp_path, tokenizer_files):
    model = tiny_model(tmp_path / "base", "llama", tokenizer_files)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(str(model), str(tmp_path / "nope"))


@pytest.mark.parametrize("backend", ["torch", "hybrid", "jittor"])
def test_a_medusa2_directory_loads_backbone_and_heads_from_one_model(tmp_path, tokenizer_files, backend):
    model = medusa2_dir(tmp_path / "medusa2-tiny", tokenizer_files)
    b = load_backend(backend, model=str(model), tree="cpu_medium", device="cpu")
    info = b.describe()
    assert info["heads"] == "medusa-2:medusa2-tiny" and info["num_heads"] == 3
    base, medusa, steps = greedy_pair(b)
    assert medusa == base and steps < len(medusa)


# ----------------------------------------------------------------------------- trees


def test_tree_choice_order(tmp_path, tokenizer_files):
    model = tiny_model(tmp_path / "base", "llama", tokenizer_files)
    heads = faster_decoding_heads(tmp_path / "heads", model)
    assert resolve(str(model), str(heads)).tree_name == "cpu_small"
    assert resolve(str(model), str(heads), device="cuda").tree_name == "mc_sim_7b_63"
    (heads / "tree-jittor.json").write_text("[[0], [1]]")
    assert resolve(str(model), str(heads), backend="jittor").tree == ((0,), (1,))
    assert resolve(str(model), str(heads), backend="torch").tree_name == "cpu_small"
    assert resolve(str(model), str(heads), tree="chain2", backend="jittor").tree == ((0,), (0, 0))
