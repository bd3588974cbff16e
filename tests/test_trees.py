import numpy as np
import pytest

from medusa.core.buffers import build_buffers
from medusa.core.trees import TOPK, chain, named_trees, resolve, trim, validate

ALL = sorted(named_trees())
MEDUSA_NINE = ["mc_sim_7b_63", "vicuna_7b_stage2", "vicuna_7b_stage1", "vicuna_7b_stage1_ablation",
               "vicuna_13b_stage2", "vicuna_13b_stage1", "vicuna_33b_stage2", "vicuna_33b_stage1", "zephyr_stage2"]


def test_the_nine_original_trees_are_there():
    trees = named_trees()
    assert set(MEDUSA_NINE) <= set(trees)
    assert len(trees["mc_sim_7b_63"]) == 63


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
