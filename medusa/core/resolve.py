"""One decision per run: ``--model`` + ``--medusa-heads`` + ``--tree`` -> what every backend loads.

Every backend, CLI, the server, the app and the evaluation scripts call ``resolve``; nothing else
decides which model directory, which heads, which tree or which proposal vocabulary a run uses.

- **Model**: any form ``core.models.resolve_model`` takes (short name, HF directory, GGUF file, hub
  id from the local Hugging Face cache).  Left out (None), it is the base model the given heads
  name in their ``config.json`` when that resolves, else the embedded default.
- **Heads**: a heads directory or a hub id of one (FasterDecoding layout: ``config.json`` +
  ``medusa_lm_head.{safetensors,pt}``); ``"fresh"`` for untrained heads; None for the model's own:
  the heads inside a Medusa-2 directory, else the heads shipped for an embedded model, else fresh
  heads with one warning (baseline decoding never needs heads).
- **Tree**: ``--tree``, else the tree measured for this backend beside the heads
  (``tree-BACKEND.json``: step latency differs between frameworks), else the one the heads'
  config names, else the device's default; trimmed to the number of heads.

Only numpy is loaded here (heads as a numpy state dict); each backend turns it into modules.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .checkpoint import CheckpointError, StateDict, check_base_model, load_checkpoint, medusa2_heads
from .config import MedusaConfig
from .models import DEFAULT_MODEL, ModelError, hub_snapshot, resolve_model, shipped_heads
from .token_map import load_token_map
from .trees import Tree, resolve as resolve_tree

log = logging.getLogger(__name__)

FRESH_HEADS = MedusaConfig(medusa_num_heads=4, medusa_num_layers=1, shared_lm_head=True)
DEFAULT_TREES = {"cpu": "cpu_small", "cuda": "mc_sim_7b_63"}  # small trees pay on CPUs, wide ones on GPUs
FRESH = "fresh"


@dataclass(frozen=True)
class Resolved:
    """Everything decided once per run, framework-free."""

    model: str  # as the user named it (or as the heads named it)
    model_dir: Path
    heads_dir: Optional[Path]  # None: fresh heads; the model directory for a Medusa-2 checkpoint
    heads_source: str  # "given:NAME" (NAME: the directory's name or the hub id), "medusa-2:NAME", "shipped:NAME", "fresh"
    heads_config: MedusaConfig
    heads_state: Optional[StateDict]  # None: fresh heads
    token_map: Optional[np.ndarray]  # the proposal vocabulary, or None for the full vocabulary
    tree_name: str
    tree: Tree

    def describe(self) -> dict[str, Any]:
        """What was loaded, without filesystem paths (responses may leave the machine)."""
        c = self.heads_config
        return {"model": self.model, "heads": self.heads_source, "num_heads": c.medusa_num_heads,
                "num_layers": c.medusa_num_layers, "head_type": c.head_type, "shared_lm_head": c.shared_lm_head,
                "tree": Path(self.tree_name).name, "tree_nodes": len(self.tree)}


def resolve(model: Optional[str] = None, heads: Optional[str] = None, tree: Optional[str] = None,
            backend: str = "torch", device: str = "cpu") -> Resolved:
    """Decide model directory, heads, token map and tree (see the module docstring)."""
    heads_dir = _heads_dir(heads)
    config, state = load_checkpoint(heads_dir) if heads_dir is not None else (FRESH_HEADS, None)
    model = model or _base_model(config) or DEFAULT_MODEL
    model_dir = resolve_model(model)
    if heads_dir is not None:
        check_base_model(config, model, model_dir)
        source = f"given:{heads if _is_hub_id(heads) else heads_dir.name}"
    elif heads == FRESH:
        source = FRESH
    else:
        heads_dir, source, config, state = _own_heads(model, model_dir)
    token_map = load_token_map(heads_dir, config)
    tree_name = _tree_name(tree, heads_dir, config, backend, device)
    return Resolved(model, model_dir, heads_dir, source, config, state, token_map, tree_name,
                    resolve_tree(tree_name, config.medusa_num_heads))


def _is_hub_id(heads: Optional[str]) -> bool:
    return heads is not None and not Path(heads).expanduser().exists()


def _heads_dir(heads: Optional[str]) -> Optional[Path]:
    """The directory ``--medusa-heads`` names (a path or a hub id in the HF cache), or None."""
    if heads is None or heads == FRESH:
        return None
    path = Path(heads).expanduser()
    if path.is_dir():
        return path.resolve()
    if not path.exists() and "/" in heads and not heads.startswith((".", "/", "~")):
        try:
            return hub_snapshot(heads, need_config=False)
        except ModelError as err:
            raise CheckpointError(f"Medusa heads {heads!r}: no such directory, and as a hub id: {err}") from None
    raise CheckpointError(f"Medusa heads {heads!r}: no such directory (expected config.json + medusa_lm_head.safetensors "
                          "or .pt, a hub id in the Hugging Face cache, or 'fresh')")


def _base_model(config: MedusaConfig) -> Optional[str]:
    """The base model the heads' config names (a Medusa-2 directory names itself), if it resolves here."""
    name = config.base_model_name_or_path
    if not name:
        return None
    try:
        resolve_model(name)
    except ModelError:
        log.warning("the heads name base model %r, which is not available here: pass --model", name)
        return None
    log.info("model: %s (named by the heads' config)", name)
    return name


def _own_heads(model: str, model_dir: Path) -> tuple[Optional[Path], str, MedusaConfig, Optional[StateDict]]:
    """No ``--medusa-heads``: the model's built-in (Medusa-2) or shipped heads, else fresh ones."""
    built_in = medusa2_heads(model_dir)
    if built_in is not None:
        return model_dir, f"medusa-2:{model_dir.name}", *built_in
    shipped = shipped_heads(model)
    if shipped is not None:
        return shipped, f"shipped:{shipped.name}", *load_checkpoint(shipped)
    log.warning("no Medusa heads for %s: using fresh (untrained) heads, expect little speed-up; "
                "train some (scripts/medusa/run.sh) or pass --medusa-heads", model)
    return None, FRESH, FRESH_HEADS, None


def _tree_name(tree: Optional[str], heads_dir: Optional[Path], config: MedusaConfig, backend: str,
               device: str) -> str:
    if tree:
        return tree
    if heads_dir is not None:
        own = heads_dir / f"tree-{backend}.json"
        if own.is_file():
            return str(own)
        if config.tree and (heads_dir / config.tree).is_file():
            return str(heads_dir / config.tree)
    if config.tree:
        return config.tree
    return DEFAULT_TREES["cuda" if device.startswith("cuda") else "cpu"]
