import hashlib
import json

import numpy as np
import pytest

from medusa.core.buffers import build_buffers
from medusa.core.trees import TOPK, chain, named_trees, resolve, trim, validate

ALL = sorted(named_trees())
# The nine trees of the original Medusa (FasterDecoding/Medusa, medusa/model/medusa_choices.py, at
# e2a5d20): each has 63 nodes; the hash is sha256(json.dumps([list(p) for p in paths])) over its paths
# in the original order, which for mc_sim_7b_63 is also the hash of the list as written in that file.
MEDUSA_NINE = {
    "mc_sim_7b_63": "35c38d3c9cde7957c18de9f5cca50aa9fd3b3947479a0f171412e87b7c3ad3d6",
    "vicuna_7b_stage2": "39fbc6f667c1b129d7ee3eefec19361fe5c2ae733c0726fe30eb52deb5ea3357",
    "vicuna_7b_stage1_ablation": "944fab219933cda359ec7d3efc4f7e10b345bead3978bbd3775588201f953bde",
    "vicuna_7b_stage1": "7a9f647ee775c4d7dc09b082a9f5f975ed1c55d3e12b74628c09feb2c429865a",
    "vicuna_13b_stage2": "81755b321a66ed2c0a9d88554e204265b94ce33ccb7afa38dd1187c45cb015d6",
    "vicuna_13b_stage1": "6df6cfc919a321cc769263553c699851928e7933598bb1085ec329532c1ad858",
    "vicuna_33b_stage2": "22778f6a7b3d19d2c9fc21e5a782f7ad63a98114e3d8293461e010aeba054b8d",
    "vicuna_33b_stage1": "9db410c819cdbf94dc19a311edf25dd962c02af9c1d51c8c90a0f75f215f955d",
    "zephyr_stage2": "a93cbb6a38c62726e581dddccfe33ec09e9740ec5a0e5b841f3bd04dbedad72f",
}


@pytest.mark.parametrize("name", list(MEDUSA_NINE))
def test_the_nine_original_trees_are_there(name):
    paths = named_trees()[name]
    assert len(paths) == 63 and validate(paths)  # node count as published; prefix-closed
    assert hashlib.sha256(json.dumps([list(p) for p in paths]).encode()).hexdigest() == MEDUSA_NINE[name]


@pytest.mark.parametrize("name", ALL)
def test_buffer_invariants(name):
    tree = validate(named_trees()[name])
    b = build_buffers(tree)
    paths = [()] + list(tree)
    n = len(paths)
    assert b.attn_mask.shape == (n, n) and b.attn_mask.diagonal().all()
    for i, p in enumerate(paths):
        ancestors = {paths.index(p[:k]) for k in range(len(p) + 1)}
        assert set(np.flatnonzero(b.attn_mask[i])) == ancestors  # exactly ancestors + self
        assert b.position_ids[i] == len(p)
        if p:
            assert b.tree_indices[i] == 1 + (len(p) - 1) * TOPK + p[-1]
            assert paths[b.parents[i]] == p[:-1]
    leaves = {p for p in paths if not any(q[: len(p)] == p and len(q) > len(p) for q in paths)}
    got = set()
    for row in b.retrieve_indices:
        nodes = [int(x) for x in row if x >= 0]
        assert nodes[0] == 0 and (row[len(nodes):] == -1).all()
        for a, c in zip(nodes, nodes[1:]):
            assert b.parents[c] == a  # consecutive nodes are parent -> child
        got.add(paths[nodes[-1]])
    assert got == leaves


def test_chain_is_causal():
    b = build_buffers(chain(4))
    assert (b.attn_mask == np.tril(np.ones((5, 5), dtype=bool))).all()
    assert b.retrieve_indices.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("bad, msg", [([(0,), (0, 0), (1, 1)], "prefix-closed"), ([(10,)], "rank"),
                                      ([(0,), (0,)], "duplicate"), ([()], "non-empty")])
def test_validation_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        validate(bad)


def test_trim_to_head_count():
    tree = resolve("mc_sim_7b_63", num_heads=2)
    assert max(len(p) for p in tree) == 2
    assert validate(tree) == tree
    assert trim(chain(5), 3) == chain(3)


def test_tree_from_json_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('{"tree": [[0], [0, 0], [1]]}')
    assert resolve(str(f), 4) == ((0,), (1,), (0, 0))
    with pytest.raises(ValueError, match="unknown tree"):
        resolve("no-such-tree", 4)
