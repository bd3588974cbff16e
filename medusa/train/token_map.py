"""``python -m medusa.train.token_map``: give trained shared-lm_head heads a proposal vocabulary.

Counts the assistant tokens of the training split's hidden-state cache, keeps the ``--size`` most
frequent as ``token_map.json`` beside the heads (named in their ``config.json``) and reports how
much of the held-out split it covers.  Every backend then projects head states onto those rows
only (see ``medusa.core.token_map``).  This is for heads trained over the full vocabulary;
``medusa.train --token-map-size`` builds the same map before training and trains over it.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.checkpoint import CONFIG_NAME, CheckpointError, load_checkpoint
from ..core.io import atomic_write_text
from ..core.token_map import TOKEN_MAP_FILE, build_token_map, coverage
from ..core.models import DEFAULT_MODEL, resolve_model
from .hidden_cache import cached_labels, default_cache_dir
from .trainer import METRICS_FILE

log = logging.getLogger("medusa.train.token_map")


def write_token_map(heads_dir: Path, cache_dir: Path, size: int) -> dict:
    """Build the map from ``cache_dir``'s train split, measure it on its eval split, write it beside the heads."""
    result = build_token_map(cached_labels(cache_dir / "train"), size)
    result["held_out_coverage"] = coverage(np.array(result["ids"]), cached_labels(cache_dir / "eval"))
    atomic_write_text(heads_dir / TOKEN_MAP_FILE, json.dumps(result) + "\n")
    log.info("%d ids cover %.4f of training targets, %.4f held out", len(result["ids"]), result["coverage"],
             result["held_out_coverage"])
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--medusa-heads", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="hidden-state cache holding train/ and eval/ (default: the one the heads' metrics.json "
                        "names, else the one `medusa.train` fills for --model/--data/--max-length)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=None, help="the training conversations (to find the default cache)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--size", type=int, default=8192)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, _ = load_checkpoint(args.medusa_heads)
    if not config.shared_lm_head:
        raise CheckpointError("a token map needs shared-lm_head heads")
    result = write_token_map(args.medusa_heads, _cache_dir(args, p), args.size)
    raw = json.loads((args.medusa_heads / CONFIG_NAME).read_text())
    atomic_write_text(args.medusa_heads / CONFIG_NAME, json.dumps(dict(raw, token_map=TOKEN_MAP_FILE), indent=2) + "\n")
    return result


def _cache_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """``--cache-dir``, else the cache the heads were trained from, else the default one of ``--data``."""
    if args.cache_dir is not None:
        return args.cache_dir
    metrics = args.medusa_heads / METRICS_FILE
    recorded = json.loads(metrics.read_text()).get("cache_dir") if metrics.is_file() else None
    if recorded:
        return Path(recorded)
    if args.data is None:
        parser.error("give --cache-dir, or --data (and --model/--max-length as in training)")
    return default_cache_dir(resolve_model(args.model), args.data, args.max_length)


if __name__ == "__main__":
    main()
