"""Copy trained heads into the package (``medusa/shipped/NAME``) as fp16 safetensors.

What ships: the Medusa checkpoint (``config.json`` naming its tree, ``medusa_lm_head.safetensors``),
``tree.json`` from the tree search, ``token_map.json`` (proposal vocabulary) and ``metrics.json``
from training; the optimiser state does not, nor the training machine's paths (``metrics.json``'s
data, model and cache directories, the trees' reuse keys): their hashes and counts stay.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
from ..core.io import atomic_write_text
from ..core.token_map import TOKEN_MAP_FILE

LOCAL_KEYS = ("data", "model_dir", "cache_dir", "key")  # where things were on the training machine


def ship(heads_dir: Path, dest: Path) -> Path:
    """Write the shipped copy beside ``dest``, then swap it in whole: no file of earlier heads (a
    ``tree-BACKEND.json`` the new heads lack, say) survives, and a failure leaves ``dest`` as it was."""
    staging = dest.with_name(f".{dest.name}.shipping")
    shutil.rmtree(staging, ignore_errors=True)
    config, state = load_checkpoint(heads_dir)
    extra = {k: v for k, v in json.loads((heads_dir / CONFIG_NAME).read_text()).items() if k == "training"}
    save_checkpoint(staging, config, {k: v.astype(np.float16) for k, v in state.items()}, extra=extra)
    for path in [heads_dir / n for n in ("tree.json", "metrics.json", TOKEN_MAP_FILE)] + sorted(heads_dir.glob("tree-*.json")):
        if path.is_file():
            atomic_write_text(staging / path.name, _without_local_paths(path))
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _without_local_paths(path: Path) -> str:
    data = json.loads(path.read_text())
    record = {k: v for k, v in data.items() if k not in LOCAL_KEYS} if isinstance(data, dict) else data
    indent = None if path.name == TOKEN_MAP_FILE else 1  # 8,192 ids: one line, as training wrote it
    return json.dumps(record, indent=indent) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--medusa-heads", type=Path, required=True)
    p.add_argument("--name", required=True, help="model short name, e.g. smollm2-135m")
    args = p.parse_args(argv)
    ship(args.medusa_heads, Path(__file__).resolve().parents[1] / "shipped" / args.name)


if __name__ == "__main__":
    main()
