import json
import subprocess
import sys

import numpy as np
import pytest

from medusa.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, check_shapes
from medusa.core.config import GenerationConfig, LlamaArgs, MedusaConfig
from medusa.core.engine import Step, generate
from medusa.core.models import ModelError, resolve_model, load_args
from medusa.core.stats import Record, speedups, summarize


def test_core_imports_no_framework():
    code = ("import sys, medusa.core.trees, medusa.core.buffers, medusa.core.config, medusa.core.checkpoint, "
            "medusa.core.engine, medusa.core.stats, medusa.core.backends, medusa.core.models, medusa.core.prompts, "
            "medusa.core.weights, medusa.core.acceptance, medusa.core.token_map; bad = [m for m in ('torch', 'jittor') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _state(heads=3, layers=2, h=8, v=20, shared=False):
    rng = np.random.default_rng(0)
    s = {}
    for i in range(heads):
        for j in range(layers):
            s[f"{i}.{j}.linear.weight"] = rng.standard_normal((h, h)).astype(np.float32)
            s[f"{i}.{j}.linear.bias"] = rng.standard_normal(h).astype(np.float32)
        if not shared:
            s[f"{i}.{layers}.weight"] = rng.standard_normal((v, h)).astype(np.float32)
    return s


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("shared", [False, True])
def test_checkpoint_round_trip(tmp_path, fmt, shared):
    state = _state(shared=shared)
    cfg = MedusaConfig(3, 2, "base", shared_lm_head=shared)
    save_checkpoint(tmp_path, cfg, state, fmt=fmt)
    cfg2, state2 = load_checkpoint(tmp_path)
    assert (cfg2.medusa_num_heads, cfg2.medusa_num_layers, cfg2.shared_lm_head) == (3, 2, shared)
    assert cfg2.base_model_name_or_path == "base"
    assert state2.keys() == state.keys() and all(np.array_equal(state[k], state2[k]) for k in state)
    assert json.loads((tmp_path / "config.json").read_text())["medusa_num_heads"] == 3


def test_checkpoint_errors(tmp_path, caplog):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint(tmp_path, MedusaConfig(3, 2), _state())
    with pytest.raises(CheckpointError, match="another model"):
        check_shapes(load_checkpoint(tmp_path)[1], hidden_size=16, vocab_size=20)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 5}))
    assert load_checkpoint(tmp_path)[0].medusa_num_heads == 3  # the weights decide; the config gets a warning
    assert "medusa_num_heads=5 but the weights hold 3" in caplog.text
    (tmp_path / "config.json").write_text("{}")
    data = (tmp_path / "medusa_lm_head.safetensors").read_bytes()
    (tmp_path / "medusa_lm_head.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)
    broken = _state()
    del broken["1.0.linear.bias"]
    with pytest.raises(CheckpointError, match="missing key '1.0.linear.bias'"):
        save_checkpoint(tmp_path / "b", MedusaConfig(3, 2), broken)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        load_args(tmp_path)


def test_llama_args_variants():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    qwen = LlamaArgs.from_hf_config(dict(base, model_type="qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.num_kv_heads == 2 and qwen.head_dim == 4
    l3 = LlamaArgs.from_hf_config(dict(base, model_type="llama", rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}))
    assert l3.rope_theta == 5e5 and l3.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        LlamaArgs.from_hf_config(dict(base, model_type="llama", rope_scaling={"type": "yarn", "factor": 2}))


def test_generation_config_validation():
    assert GenerationConfig(temperature=0).mode == "greedy"
    assert GenerationConfig(temperature=0.7, acceptance="nucleus").mode == "nucleus"
    for bad in (dict(max_new_tokens=0), dict(top_p=0), dict(acceptance="beam")):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


class ScriptedDecoder:
    """Replays a fixed continuation in chunks, like Medusa steps of a known length."""

    def __init__(self, continuation, chunk=3, tree=4, max_len=100):
        self.cont, self.chunk, self.tree_size, self.max_len = continuation, chunk, tree, max_len
        self.pos, self.cache_length = 0, 0

    def prefill(self, ids, cfg):
        self.cache_length, self.pos = len(ids), 0
        return self.cont[0]

    def decode_one(self, root, cfg):
        self.pos += 1
        self.cache_length += 1
        return self.cont[self.pos]

    def medusa_step(self, root, cfg):
        toks = self.cont[self.pos:self.pos + self.chunk]
        self.pos += self.chunk
        self.cache_length += self.chunk
        return toks, self.chunk - 1, self.cont[self.pos]


@pytest.mark.parametrize("medusa", [False, True])
def test_engine_stops_at_eos_inside_a_chunk(medusa):
    cont = [5, 6, 7, 8, 2, 9, 9, 9, 9, 9, 9, 9]
    steps = list(generate(ScriptedDecoder(cont), [1, 1], GenerationConfig(max_new_tokens=50, medusa=medusa,
                                                                        stop_token_ids=(2,))))
    assert [t for s in steps for t in s.tokens] == [5, 6, 7, 8, 2]
    assert steps[-1].finish_reason == "stop" and all(s.finish_reason is None for s in steps[:-1])


@pytest.mark.parametrize("medusa", [False, True])
@pytest.mark.parametrize("limit", [1, 4, 7])
def test_engine_counts_tokens_not_steps(medusa, limit):
    steps = list(generate(ScriptedDecoder(list(range(10, 40))), [1], GenerationConfig(max_new_tokens=limit, medusa=medusa)))
    assert sum(len(s.tokens) for s in steps) == limit and steps[-1].finish_reason == "length"


@pytest.mark.parametrize("medusa", [False, True])
def test_the_first_token_streams_before_any_step_runs(medusa):
    """Time to first token is the prefill's: the prefill's token is its own step, yielded before
    the first forward pass; each later step ends with its bonus token."""
    dec = ScriptedDecoder(list(range(10, 40)), chunk=3)
    stream = generate(dec, [1, 1], GenerationConfig(max_new_tokens=9, medusa=medusa))
    first = next(stream)
    assert first.tokens == (10,) and first.sources == ("bonus",) and dec.pos == 0  # no step ran yet
    rest = list(stream)
    assert [t for s in (first, *rest) for t in s.tokens] == list(range(10, 19))
    assert all(s.sources[-1] == "bonus" for s in rest[:-1])
    if medusa:  # three tokens a step: two accepted drafts, then the bonus
        assert rest[0].tokens == (11, 12, 13) and rest[0].sources == ("heads", "heads", "bonus")
        assert rest[0].accepted == 2


def test_engine_stops_before_kv_overflow():
    dec = ScriptedDecoder(list(range(10, 60)), chunk=3, tree=4, max_len=12)
    steps = list(generate(dec, [1, 1, 1], GenerationConfig(max_new_tokens=50)))
    assert steps[-1].finish_reason == "length" and dec.cache_length <= 12
    with pytest.raises(ValueError, match="does not fit"):
        list(generate(ScriptedDecoder([1]), [1] * 100, GenerationConfig()))


def test_stats_summary_and_speedup():
    recs = [Record(1, "math", "baseline", 1, 10, 10, 2.0, []), Record(1, "math", "medusa", 1, 10, 4, 1.0, [],
                                                                     {2: 2, 3: 2})]
    s = summarize(recs)
    assert s["medusa"]["mean_accept_length"] == 2.5 and s["medusa"]["accept_hist"] == {2: 2, 3: 2}
    assert speedups(s) == {"medusa": 2.0}
    assert s["baseline"]["per_category"]["math"]["tokens_per_second"] == 5.0


def test_token_map_keeps_the_most_frequent_targets_and_loads_strictly(tmp_path):
    import json

    from medusa.core.checkpoint import CheckpointError
    from medusa.core.config import MedusaConfig
    from medusa.core.token_map import build_token_map, coverage, load_token_map

    labels = np.array([5, 5, 5, 9, 9, 2, -100, 7, 5, 9])
    built = build_token_map(labels, 2)
    assert built["ids"] == [5, 9] and built["coverage"] == pytest.approx(7 / 9)
    assert coverage(np.array([5, 9]), np.array([5, 2, -100, 9])) == pytest.approx(2 / 3)
    (tmp_path / "map.json").write_text(json.dumps(built))
    shared = MedusaConfig(2, 1, shared_lm_head=True, token_map="map.json")
    assert load_token_map(tmp_path, shared).tolist() == [5, 9]
    assert load_token_map(tmp_path, MedusaConfig(2, 1, shared_lm_head=True)) is None
    # own lm_heads propose over the full vocabulary: the map is kept for exports, not applied
    assert load_token_map(tmp_path, MedusaConfig(2, 1, shared_lm_head=False, token_map="map.json")) is None
    (tmp_path / "map.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable token map"):
        load_token_map(tmp_path, shared)
