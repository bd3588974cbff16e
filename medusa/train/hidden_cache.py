"""Backbone hidden states cached on disk, so epochs and head configurations reuse one backbone pass.

On a CPU the backbone forward dominates training time; with the backbone frozen its final hidden
states never change, so they are computed once.  Shards (``shard-NNNNN.npz``: ``hidden`` fp16
[tokens, h], ``ids`` and ``labels`` int32 [tokens], ``offsets`` [examples + 1]) are written
atomically, one per ``shard_size`` examples.  A shard is written under a temporary name that can
never be taken for a shard (``.shard-NNNNN.npz.*.tmp``), so a ``kill -9`` mid-write leaves nothing
the next run would load.

A cache is keyed by what it contains, never by a file name: ``meta.json`` (per split) records the
``CacheKey`` (model directory and fingerprint, backbone framework and dtype, tokenisation settings)
and, for every shard, a digest of its examples' token ids and labels.  A rerun reads it back and
keeps exactly the shards whose key and examples still match: the same data is reused, appended
conversations only add shards, and a changed model, backbone or content (the same file name with
other replies) is rebuilt from where it differs, with one log line saying which.

A 7B model's cache of ShareGPT is hundreds of gigabytes, so training never loads it whole:
``open_hidden`` memory-maps the ``hidden`` array inside an (uncompressed) shard, and batches read
only their rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..core.io import atomic_write, atomic_write_text, file_sha256
from ..core.models import cache_root
from ..llama import KVCache, Transformer
from .dataset import Example

log = logging.getLogger(__name__)
HiddenFn = Callable[[list[int]], np.ndarray]  # token ids -> final hidden states [T, h]
SHARD_NAME = re.compile(r"shard-\d+\.npz")  # exactly; never a temporary file (see _write_shard)
META_FILE = "meta.json"  # per split: the key, every shard with its examples' digest, recorded info
META_VERSION = 2  # 1 (no key, no digests) is rebuilt on first use
CONTENT_HASH_LIMIT = 64 * 2**20  # model files up to this size are fingerprinted by content


@torch.inference_mode()
def hidden_states(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Final-norm hidden states [T, h] of one sequence (causal prefill)."""
    t = len(ids)
    device = model.tok_embeddings.weight.device
    cache = KVCache(model.args, t, model.tok_embeddings.weight.dtype, device)
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return model(torch.tensor([ids], device=device), torch.arange(t, device=device), mask, cache)[0]


def torch_hidden_fn(model: Transformer) -> HiddenFn:
    return lambda ids: hidden_states(model, ids).float().cpu().numpy()


def build_cache(hidden_fn: HiddenFn, hidden_size: int, examples: Sequence[Example], out_dir: Path,
                shard_size: int = 256, key: Optional[dict[str, Any]] = None,
                info: Optional[dict[str, Any]] = None) -> int:
    """Cache hidden states of ``examples`` (in order) under ``out_dir``; returns examples cached in all.

    ``hidden_fn`` maps token ids to the frozen backbone's final hidden states [T, h] (any framework);
    it is called only for examples not cached yet.  ``key`` says what produced the states (model,
    backbone, tokenisation: see ``CacheKey``); a cache made under another key is rebuilt.  Shards
    whose examples equal the leading ``examples`` are kept, the rest is (re)computed; one log line
    says which of building, reusing, extending or rebuilding happened.  ``info`` (e.g. the data's
    hash and conversation count) is recorded in ``meta.json`` beside the key.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial_shards(out_dir)
    key = dict(key or {})
    kept, reason = _matching_shards(out_dir, key, examples)
    _drop_shards_after(out_dir, kept)
    done = sum(s["examples"] for s in kept)
    _log_decision(out_dir, reason, done, len(examples))
    meta = {"version": META_VERSION, "key": key, "hidden_size": hidden_size, "examples": len(examples),
            "shards": kept, **(info or {})}
    if read_meta(out_dir) != meta:
        _write_meta(out_dir, meta)  # before any new shard: the record never names a shard that is gone
    todo = range(done, len(examples))
    with tqdm(total=len(examples), initial=done, desc="hidden cache", unit="ex", disable=not todo) as bar:
        for number, start in enumerate(todo[::shard_size], start=len(kept)):
            chunk = examples[start:start + shard_size]
            name = f"shard-{number:05d}.npz"
            _write_shard(out_dir / name, hidden_fn, chunk, bar)
            kept.append({"file": name, "examples": len(chunk), "sha256": examples_digest(chunk)})
            _write_meta(out_dir, meta)  # after each shard: a killed run resumes from the last one recorded
    return len(examples)


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' token ids and labels, in order: what a shard's hidden states depend on."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.ids, dtype=np.int32).tobytes())
        h.update(b"|")
        h.update(np.asarray(ex.labels, dtype=np.int32).tobytes())
        h.update(b"\n")
    return h.hexdigest()


def read_meta(split_dir: Path) -> Optional[dict[str, Any]]:
    """The split's ``meta.json`` (key, shards and their digests, recorded info), None if absent or unreadable."""
    try:
        meta = json.loads((split_dir / META_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(split_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(split_dir / META_FILE, json.dumps(meta, indent=1) + "\n")


def _matching_shards(split_dir: Path, key: dict[str, Any], examples: Sequence[Example]
                     ) -> tuple[list[dict[str, Any]], Optional[str]]:
    """The recorded shards (in order) that hold exactly the leading ``examples`` under ``key``, and
    why the first of the others cannot be kept (None when all recorded shards match)."""
    meta, on_disk = read_meta(split_dir), shard_files(split_dir)
    if meta is None or meta.get("version") != META_VERSION:
        return [], "no record of its contents (an earlier version's cache)" if on_disk else None
    if meta.get("key") != key:
        changed = sorted(k for k in set(key) | set(meta.get("key", {})) if key.get(k) != meta["key"].get(k))
        return [], f"made with another {', '.join(changed)}"
    kept, start = [], 0
    for shard in meta.get("shards", []):
        chunk = examples[start:start + shard["examples"]]
        if not (split_dir / shard["file"]).is_file():
            return kept, f"{shard['file']} is missing"
        if len(chunk) < shard["examples"] or examples_digest(chunk) != shard["sha256"]:
            return kept, "the data changed"
        kept.append(shard)
        start += shard["examples"]
    return kept, None


def _drop_shards_after(split_dir: Path, kept: list[dict[str, Any]]) -> None:
    """Delete every shard file not among ``kept`` (changed data, or written after the last record)."""
    names = {s["file"] for s in kept}
    for f in shard_files(split_dir):
        if f.name not in names:
            f.unlink()


def _log_decision(split_dir: Path, reason: Optional[str], done: int, total: int) -> None:
    """The one line that says what happens to the split: built, reused, extended or rebuilt (and why)."""
    if reason is not None:
        where = f"all {total} examples" if done == 0 else f"from example {done} of {total}"
        log.info("hidden cache %s: rebuilding %s: %s", split_dir, where, reason)
    elif done == 0:
        log.info("hidden cache %s: building %d examples", split_dir, total)
    elif done == total:
        log.info("hidden cache %s: reusing all %d examples (same key and contents)", split_dir, total)
    else:
        log.info("hidden cache %s: extending: %d examples cached, %d appended", split_dir, done, total - done)


def _write_shard(path: Path, hidden_fn: HiddenFn, chunk: Sequence[Example], bar: tqdm) -> None:
    hidden, offsets = [], [0]
    for ex in chunk:
        hidden.append(hidden_fn(ex.ids).astype(np.float16))
        offsets.append(offsets[-1] + len(ex.ids))
        bar.update(1)
    arrays = dict(hidden=np.concatenate(hidden), offsets=np.array(offsets, dtype=np.int64),
                  ids=np.array([i for ex in chunk for i in ex.ids], dtype=np.int32),
                  labels=np.array([i for ex in chunk for i in ex.labels], dtype=np.int32))

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
            np.savez(f, **arrays)

    atomic_write(path, write)  # temporary name ".shard-NNNNN.npz.XXXX.tmp": never a shard


def _remove_partial_shards(cache_dir: Path) -> None:
    """Delete what an interrupted write left: our temporary files and the old ``shard-N.npz.tmp.npz``."""
    for f in [*cache_dir.glob(".shard-*.tmp"), *cache_dir.glob("shard-*.npz.tmp.npz")]:
        log.warning("removing %s, left by an interrupted cache write", f)
        f.unlink()


def shard_files(cache_dir: Path) -> list[Path]:
    """The complete shards of a cache split, in order (temporary and foreign files never match)."""
    return sorted(f for f in cache_dir.glob("shard-*.npz") if SHARD_NAME.fullmatch(f.name))


def open_hidden(shard: Path) -> np.ndarray:
    """The shard's ``hidden`` array [tokens, h], memory-mapped: rows are read from disk when indexed.

    ``np.savez`` stores members uncompressed, so the array's bytes lie contiguous in the zip; a
    compressed member (a cache written by other means) is read into memory instead."""
    with zipfile.ZipFile(shard) as archive:
        info = archive.getinfo("hidden.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return np.load(shard)["hidden"]
    with shard.open("rb") as f:
        f.seek(info.header_offset + 26)  # the local file header: name and extra-field lengths at byte 26
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(shard)["hidden"]
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(shard, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass(frozen=True)
class CacheKey:
    """What the cached hidden states depend on besides the examples themselves (whose token ids
    and labels each shard records as a digest): the model (resolved directory + ``model_fingerprint``),
    the backbone that ran it (framework and dtype) and the tokenisation settings."""

    model_dir: str
    model_fingerprint: str
    backbone: str  # "torch" or "jittor"
    dtype: str
    max_length: int
    conv_template: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_fingerprint(model_dir: Path) -> str:
    """A cheap identity of a model directory's weights, config and tokenizer: sha256 over its files
    (top level, sorted), small ones (config, tokenizer, chat template, a tiny model's weights) by
    content, larger ones (weight shards) by name, size and modification time, since hashing
    gigabytes on every run would cost minutes; rewriting a weight file changes its mtime."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = f.stat()
        h.update(f"{f.name}\0{stat.st_size}\0".encode())
        h.update(file_sha256(f).encode() if stat.st_size <= CONTENT_HASH_LIMIT else str(stat.st_mtime_ns).encode())
    return h.hexdigest()


def default_cache_dir(model_dir: Path, data: Path, max_length: int, backbone: str = "torch",
                      dtype: str = "bfloat16", conv_template: Optional[str] = None,
                      root: Optional[Path] = None) -> Path:
    """Where the hidden states of ``data`` through ``model_dir`` are cached unless ``--cache-dir``
    says otherwise: under ``root`` (default ``$JEDUSA_CACHE/hidden``; the recipes pass ``$WORK/hidden``),
    a directory per model, data file (its resolved path), length, backbone and template.  Its
    contents are checked against the key and the data on every use (``build_cache``)."""
    ident = json.dumps([str(model_dir.resolve()), str(data.resolve()), conv_template])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
    name = f"{model_dir.name}-{data.stem}-{max_length}-{backbone}-{dtype}-{digest}"
    return (root or cache_root() / "hidden") / name


def cached_labels(cache_dir: Path) -> np.ndarray:
    """All labels of a cache split (IGNORE_INDEX where untrained)."""
    files = shard_files(cache_dir)
    if not files:
        raise FileNotFoundError(f"no hidden-state shards in {cache_dir}")
    return np.concatenate([np.load(f)["labels"] for f in files])
