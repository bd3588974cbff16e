"""``python -m medusa.train``: conversations -> tokenised examples -> hidden-state cache -> heads.

Every stage resumes: the cache keeps what still matches (see ``hidden_cache``: keyed by model,
backbone, tokenisation and the examples' contents) and training continues from the last saved
step in ``--out``.  A rerun whose heads are already trained on the same data, model and settings
(as their ``metrics.json`` records) does nothing.  Conversations are split into train / held-out
by a hash of their id, so the split is stable across runs and data growth; the held-out split is
never empty (at least one conversation) and a warning says when it is too small to trust.

``metrics.json`` records what the heads were trained on: the data file and its sha256, the model
directory and fingerprint, the backbone and its dtype, the tokenisation settings, the cache, the
conversations and positions of both splits.  ``--eval-only`` reads it back: it measures the heads
in ``--out`` on the held-out split (written to ``eval_metrics.json``; the heads, their config and
``metrics.json`` stay untouched) with no ``--data`` or ``--model`` needed, on the backbone the
heads were trained on.

Several GPUs: ``accelerate launch --num_processes N -m medusa.train ...``.  The main process fills
the hidden-state cache while the others wait (the others never load the backbone), then every
rank trains its own share of the batches (see ``trainer``); a rank's backbone and heads live on
its own device.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..backend import pick_device, torch_dtype
from ..core.checkpoint import CONFIG_NAME, load_checkpoint
from ..core.config import MedusaConfig, check_context
from ..core.io import atomic_write_text, file_sha256
from ..core.models import DEFAULT_MODEL, ModelError, load_args, resolve_model
from ..core.token_map import TOKEN_MAP_FILE, load_token_map
from ..core.weights import hf_weight_map, read_hf_numpy
from ..heads import HydraHeads, MedusaHeads, heads_from_state
from ..llama import load_llama
from .data import Conversation, load_conversations
from .dataset import tokenize_conversation
from .hidden_cache import (CacheKey, HiddenFn, build_cache, default_cache_dir, model_fingerprint, read_meta,
                           torch_hidden_fn)
from .token_map import write_token_map
from .trainer import METRICS_FILE, HeadsWithBase, TokenData, TrainConfig, TrainError, evaluate, train

log = logging.getLogger("medusa.train")
EVAL_METRICS_FILE = "eval_metrics.json"
# Ranks wait in a barrier while the main process fills the cache: hours for a 7B model on ShareGPT,
# far beyond the collectives' default timeout (10-30 minutes).
CACHE_WAIT = timedelta(hours=24)
DEFAULT_MAX_LENGTH = 512
DEFAULT_EVAL_FRACTION = 0.05
# Below these the held-out accuracies (and the tree chosen from them) are mostly noise.
TRUSTED_EVAL_CONVERSATIONS = 20
TRUSTED_EVAL_POSITIONS = 1000
UNRECORDED = ("stop_after", "trace_steps", "save_every")  # training flags that do not change the heads
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class DataOptions:
    """Which conversations train the heads, and where their hidden states are cached."""

    data: Optional[Path]  # None only for --eval-only, which reads it from the heads' metrics.json
    out: Path  # heads directory: checkpoint, metrics, resume state
    cache_dir: Optional[Path] = None  # None: a keyed directory under cache_root
    max_length: int = DEFAULT_MAX_LENGTH
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    conv_template: Optional[str] = None
    cache_root: Optional[Path] = None  # None: $JEDUSA_CACHE/hidden

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise TrainError(f"--eval-fraction must lie between 0 and 1 (exclusive), got {self.eval_fraction}")
        if self.max_length < 2:
            raise TrainError(f"--max-length must be at least 2, got {self.max_length}")

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", type=Path, default=None,
                       help="ShareGPT/JSONL conversations (e.g. self-distilled); --eval-only: the heads' own")
        p.add_argument("--out", type=Path, required=True, help="heads directory (checkpoint, metrics, resume state)")
        p.add_argument("--cache-dir", type=Path, default=None,
                       help="hidden-state cache of this data (default: a directory under --cache-root keyed by "
                            "model, data file, length, backbone and dtype)")
        p.add_argument("--cache-root", type=Path, default=None,
                       help="where keyed hidden-state caches go (default $JEDUSA_CACHE/hidden; recipes: $WORK/hidden)")
        p.add_argument("--max-length", type=int, default=None,
                       help=f"tokens per conversation (default {DEFAULT_MAX_LENGTH})")
        p.add_argument("--eval-fraction", type=float, default=None,
                       help=f"share of conversations held out (default {DEFAULT_EVAL_FRACTION}; at least one)")
        p.add_argument("--conv-template", default=None)

    @classmethod
    def from_args(cls, args: argparse.Namespace, recorded: Optional[dict] = None) -> "DataOptions":
        """The flags; where one is left out, what ``recorded`` (the heads' metrics.json) says, else the default."""
        rec = recorded or {}

        def pick(flag: Any, name: str, default: Any) -> Any:
            return flag if flag is not None else rec.get(name, default)

        data = pick(args.data, "data", None)
        # the recorded cache only with the recorded data: other data must not overwrite the heads' cache
        cache_dir = args.cache_dir if args.cache_dir is not None or args.data is not None else rec.get("cache_dir")
        return cls(None if data is None else Path(data), args.out, None if cache_dir is None else Path(cache_dir),
                   pick(args.max_length, "max_length", DEFAULT_MAX_LENGTH),
                   pick(args.eval_fraction, "eval_fraction", DEFAULT_EVAL_FRACTION),
                   pick(args.conv_template, "conv_template", None), args.cache_root)


@dataclass(frozen=True)
class Backbone:
    """What fills the hidden-state cache: ``load(model_dir)`` gives the frozen backbone's hidden-state
    function and is called only when shards are missing; ``framework`` and ``dtype`` are part of
    the cache's key, so caches of different backbones never mix."""

    load: Callable[[Path], HiddenFn]
    framework: str = "torch"
    dtype: str = "bfloat16"

    @property
    def tag(self) -> str:
        return "" if self.framework == "torch" else f"-{self.framework}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train Medusa-1 (or Hydra) heads on a frozen base model.")
    p.add_argument("--model", default=None,
                   help=f"base model (default {DEFAULT_MODEL}; with --eval-only the heads' base model)")
    DataOptions.add_args(p)
    p.add_argument("--backbone-dtype", default=None,
                   help="dtype of the cached backbone pass (default bfloat16; with --eval-only the heads' own)")
    p.add_argument("--device", default="auto",
                   help="backbone device: auto (this rank's GPU when present), cpu, cuda, cuda:N")
    TrainConfig.add_args(p)
    p.add_argument("--eval-only", action="store_true",
                   help="measure the heads in --out on the held-out split (written to eval_metrics.json), no training")
    return p


# --- data and split ------------------------------------------------------------------------------

def _id_score(conv_id: str) -> float:
    return int(hashlib.sha1(conv_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def held_out(conv_id: str, fraction: float) -> bool:
    return _id_score(conv_id) < fraction


def split_conversations(conversations: Sequence[Conversation], fraction: float) -> dict[str, list[Conversation]]:
    """{"train", "eval"} in data order, by a hash of each id (stable as data grows).  When the
    fraction holds out nothing (small data), the conversation whose id hashes lowest is held out."""
    eval_ids = {c.id for c in conversations if held_out(c.id, fraction)}
    if not eval_ids and conversations:
        eval_ids = {min(conversations, key=lambda c: _id_score(c.id)).id}
    parts = {"train": [c for c in conversations if c.id not in eval_ids],
             "eval": [c for c in conversations if c.id in eval_ids]}
    if not parts["train"] or not parts["eval"]:
        raise TrainError(f"{len(conversations)} conversation(s) with {len({c.id for c in conversations})} distinct "
                         "id(s): training needs at least two (one is held out to measure the heads); give more data")
    return parts


def read_conversations(path: Path) -> list[Conversation]:
    """The conversations of ``--data``; a missing, empty or conversation-free file is a TrainError."""
    if not path.is_file():
        raise TrainError(f"--data {path}: no such file")
    conversations, _ = load_conversations(path)
    if not conversations:
        raise TrainError(f"--data {path}: no user/assistant conversations in it (ShareGPT JSON/JSONL expected)")
    return conversations


def check_out(out: Path) -> None:
    """``--out`` must be a directory we can write (made if missing)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: the heads need a directory of their own")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainError(f"cannot create --out {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise TrainError(f"--out {out} is not writable")


# --- backbone and cache --------------------------------------------------------------------------

def rank_device(name: str) -> str:
    """This process's device for ``auto`` / ``cuda``: under ``accelerate launch`` each rank its own
    (``cuda:RANK``, or the CPU with ``--cpu``), never a shared default ``cuda:0``."""
    from accelerate import PartialState

    device = PartialState().device
    if name == "auto" or (name == "cuda" and device.type == "cuda"):
        return str(device)
    return pick_device(name)


def torch_backbone(dtype: str = "bfloat16", device: str = "auto") -> Backbone:
    """The PyTorch Llama as the cache's backbone, loaded on this rank's device when first needed."""
    torch_dtype(dtype)  # an unknown dtype fails now, not after tokenising

    def load(model_dir: Path) -> HiddenFn:
        where = rank_device(device)
        return torch_hidden_fn(load_llama(model_dir, torch_dtype(dtype), where, pack=where == "cpu"))

    return Backbone(load, "torch", dtype)


def cache_key(model_dir: Path, opts: DataOptions, backbone: Backbone) -> CacheKey:
    return CacheKey(str(model_dir.resolve()), model_fingerprint(model_dir), backbone.framework, backbone.dtype,
                    opts.max_length, opts.conv_template)


def cache_dir_for(model_dir: Path, opts: DataOptions, backbone: Backbone) -> Path:
    if opts.cache_dir is not None:
        return opts.cache_dir
    return default_cache_dir(model_dir, opts.data, opts.max_length, backbone.framework, backbone.dtype,
                             opts.conv_template, opts.cache_root)


def cache_splits(model_dir: Path, opts: DataOptions, backbone: Backbone, splits: Sequence[str] = SPLITS) -> Path:
    """Tokenise, split and cache the backbone's hidden states of ``splits``; returns the cache
    directory.  Only the main process writes it; the other processes wait until it is complete."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    cache_dir = cache_dir_for(model_dir, opts, backbone)
    try:
        check_context(load_args(model_dir), opts.max_length)
    except ValueError as err:
        raise TrainError(str(err)) from None
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            parts = split_conversations(read_conversations(opts.data), opts.eval_fraction)
            hidden_fn = _lazy_hidden_fn(backbone, model_dir)
            key = cache_key(model_dir, opts, backbone).as_dict()
            info = {"data": str(opts.data.resolve()), "data_sha256": file_sha256(opts.data)}
            for split in splits:
                examples = [tokenize_conversation(tokenizer, c.messages, opts.max_length, opts.conv_template)
                            for c in parts[split]]
                build_cache(hidden_fn, load_args(model_dir).hidden_size, examples, cache_dir / split, key=key,
                            info=dict(info, conversations=len(parts[split])))
    return cache_dir


def _lazy_hidden_fn(backbone: Backbone, model_dir: Path) -> HiddenFn:
    """The backbone's hidden-state function, loaded on first call (a complete cache never loads it)."""
    load = functools.cache(lambda: backbone.load(model_dir))
    return lambda ids: load()(ids)


@dataclass(frozen=True)
class Prepared:
    """The cached splits as trainable positions, the token map the heads train over, and the cache."""

    splits: dict[str, TokenData]
    vocab_ids: Optional[np.ndarray]
    cache_dir: Path


def prepare_data(model_dir: Path, opts: DataOptions, cfg: TrainConfig, backbone: Backbone) -> Prepared:
    """Cache both splits and read them as positions (with the token map, written on first use)."""
    from accelerate import PartialState

    cache_dir = cache_splits(model_dir, opts, backbone)
    vocab_ids = None
    if cfg.token_map_size:
        with PartialState().main_process_first():  # the main process writes a new map, the others read it
            vocab_ids = training_token_map(opts.out, cache_dir, cfg)
    data = {split: TokenData(cache_dir / split, cfg.num_heads, vocab_ids) for split in SPLITS}
    for split, positions in data.items():
        log.info("%s: %d conversations, %d trainable positions", split,
                 _conversations(cache_dir / split), len(positions))
    if len(data["train"]) == 0:
        raise TrainError(f"no trainable positions in {opts.data}'s training split (assistant replies empty or cut "
                         "off by --max-length?)")
    warn_if_untrustworthy(_conversations(cache_dir / "eval"), len(data["eval"]))
    return Prepared(data, vocab_ids, cache_dir)


def _conversations(split_dir: Path) -> int:
    return int((read_meta(split_dir) or {}).get("conversations", 0))


def warn_if_untrustworthy(conversations: int, positions: int) -> None:
    """A warning when the held-out split is too small for its accuracies to mean much."""
    if conversations < TRUSTED_EVAL_CONVERSATIONS or positions < TRUSTED_EVAL_POSITIONS:
        log.warning("the held-out split has only %d conversations (%d positions): its accuracies, and the tree "
                    "chosen from them, are too noisy to trust; give more data or a larger --eval-fraction "
                    "(EVAL_FRACTION in the recipes)", conversations, positions)


def training_token_map(out: Path, cache_dir: Path, cfg: TrainConfig) -> np.ndarray:
    """The proposal vocabulary the heads in ``out`` train over: the one a resumed run started with,
    else the ``cfg.token_map_size`` most frequent training targets (written beside the heads)."""
    if not cfg.shared_lm_head:
        raise TrainError("--token-map-size needs shared-lm_head heads (drop --per-head-lm-head)")
    out.mkdir(parents=True, exist_ok=True)
    file = out / TOKEN_MAP_FILE
    if file.is_file():
        ids = json.loads(file.read_text())["ids"]
    else:
        ids = write_token_map(out, cache_dir, cfg.token_map_size)["ids"]
    if len(ids) != cfg.token_map_size:
        raise TrainError(f"{file} has {len(ids)} ids but --token-map-size is {cfg.token_map_size}: "
                         "use a new --out or the same size")
    return np.asarray(ids, dtype=np.int64)


# --- what the heads were trained on --------------------------------------------------------------

def run_identity(model_dir: Path, opts: DataOptions, backbone: Backbone, cfg: TrainConfig) -> dict[str, Any]:
    """What decides the trained heads: data content, model, backbone, tokenisation, training flags."""
    training = {k: v for k, v in asdict(cfg).items() if k not in UNRECORDED}
    if cfg.head_type == "medusa":  # runs recorded before the field existed keep their identity
        del training["head_type"]
    return {"data": str(opts.data.resolve()), "data_sha256": file_sha256(opts.data),
            "model_dir": str(model_dir.resolve()), "model_fingerprint": model_fingerprint(model_dir),
            "backbone": backbone.framework, "backbone_dtype": backbone.dtype, "max_length": opts.max_length,
            "conv_template": opts.conv_template, "eval_fraction": opts.eval_fraction, "training": training}


def read_metrics(out: Path, name: str = METRICS_FILE) -> dict[str, Any]:
    try:
        metrics = json.loads((out / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def finished_metrics(out: Path, identity: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The metrics of heads in ``out`` already trained to the end with this ``identity``, else None."""
    metrics = read_metrics(out)
    same = all(metrics.get(k) == v for k, v in identity.items())
    return metrics if same and "top1" in metrics and (out / CONFIG_NAME).is_file() else None


def refuse_other_finished_run(out: Path, identity: dict[str, Any], done: Optional[dict[str, Any]]) -> None:
    """Heads finished with other data, model or settings are never relabelled nor silently replaced."""
    metrics = read_metrics(out)
    if done is not None or "top1" not in metrics:
        return
    old, new = dict(metrics, **metrics.get("training", {})), dict(identity, **identity["training"])
    key = next((k for k, v in new.items() if k != "training" and k in old and old[k] != v), None)
    what = f"{key}={old[key]!r} (this run: {new[key]!r})" if key else "other settings"
    raise TrainError(f"{out} holds heads already trained with {what}: train into a new --out "
                     "(or delete it to start over)")


def record_metrics(out: Path, metrics: dict[str, Any], identity: dict[str, Any], prepared: Prepared) -> dict:
    """Add what the heads were trained on to a finished run's ``metrics.json`` (main process)."""
    from accelerate import PartialState

    if "top1" not in metrics or not PartialState().is_main_process:
        return metrics  # stopped early (--stop-after), or not the process that writes
    record = dict(identity, cache_dir=str(prepared.cache_dir.resolve()),
                  train_conversations=_conversations(prepared.cache_dir / "train"),
                  eval_conversations=_conversations(prepared.cache_dir / "eval"),
                  train_positions=len(prepared.splits["train"]), eval_positions=len(prepared.splits["eval"]))
    merged = {**metrics, **record}
    if merged != read_metrics(out):
        atomic_write_text(out / METRICS_FILE, json.dumps(merged, indent=1) + "\n")
    return merged


# --- heads ---------------------------------------------------------------------------------------

def base_lm_head(model_dir: Path, weight: str = "output.weight") -> np.ndarray:
    """The base model's output projection [V, h] (or another of its weights, e.g. the embedding
    ``tok_embeddings.weight``) in fp32, read alone from its weight files."""
    (name,) = hf_weight_map(load_args(model_dir))[weight]
    state = read_hf_numpy(model_dir, keep=lambda key: key == name)
    if name not in state:
        raise ModelError(f"{model_dir}: weight {name} is missing from the checkpoint")
    return np.array(state[name], dtype=np.float32)  # a copy: the weight files are mapped read-only


def lm_head_rows(weight: torch.Tensor, vocab_ids: Optional[np.ndarray]) -> torch.nn.Linear:
    """A frozen ``Linear(h, V)`` of the lm_head ``weight`` [V, h], only the token map's rows if given."""
    rows = weight if vocab_ids is None else weight[torch.from_numpy(vocab_ids)]
    linear = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    linear.weight.data.copy_(rows)
    return linear.requires_grad_(False)


def fresh_heads(model_dir: Path, cfg: TrainConfig, vocab_ids: Optional[np.ndarray]
                ) -> tuple[MedusaHeads, torch.nn.Linear]:
    """Heads to train, initialised from ``cfg.seed`` (reruns start alike), and the base lm_head in fp32."""
    weight = torch.from_numpy(base_lm_head(model_dir))
    torch.manual_seed(cfg.seed)
    kind = HydraHeads if cfg.head_type == "hydra" else MedusaHeads
    heads = kind(MedusaConfig(cfg.num_heads, cfg.num_layers, shared_lm_head=cfg.shared_lm_head, head_type=cfg.head_type),
                 weight.shape[1], weight.shape[0])
    heads.init_lm_heads(weight)
    return heads, lm_head_rows(weight, vocab_ids)


def base_embedding(model_dir: Path, head_type: str) -> Optional[torch.nn.Embedding]:
    """The frozen token embedding Hydra heads read (None for Medusa heads)."""
    if head_type != "hydra":
        return None
    weight = torch.from_numpy(base_lm_head(model_dir, "tok_embeddings.weight"))
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def eval_setup(heads_dir: Path, cfg: TrainConfig) -> tuple[MedusaConfig, dict, Optional[np.ndarray], TrainConfig]:
    """The heads in ``heads_dir``, their token map, and ``cfg`` with the shape they really have."""
    config, state = load_checkpoint(heads_dir)
    vocab = load_token_map(heads_dir, config)
    cfg = replace(cfg, num_heads=config.medusa_num_heads, num_layers=config.medusa_num_layers,
                  shared_lm_head=config.shared_lm_head, token_map_size=0 if vocab is None else len(vocab),
                  head_type=config.head_type)
    return config, state, vocab, cfg


def write_eval_metrics(heads_dir: Path, metrics: dict) -> None:
    """``eval_metrics.json`` beside the heads (main process); the training's ``metrics.json`` stays."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        atomic_write_text(heads_dir / EVAL_METRICS_FILE, json.dumps(metrics, indent=1) + "\n")


# --- the two modes, shared by the PyTorch and Jittor trainers ------------------------------------

# (model_dir, prepared data, training config, heads directory, base model name) -> metrics
Trainer = Callable[[Path, Prepared, TrainConfig, Path, str], dict]
# (model_dir, held-out positions, the heads' config, state, token map, config with their shape) -> metrics
Measure = Callable[[Path, TokenData, MedusaConfig, dict, Optional[np.ndarray], TrainConfig], dict]


def train_or_evaluate(args: argparse.Namespace, backbone: Backbone, trainer: Trainer, measure: Measure) -> dict:
    """``--eval-only`` or training, with the backbone, trainer and measure of one framework."""
    if args.eval_only:
        return evaluate_only(args, backbone, measure)
    opts, cfg = DataOptions.from_args(args), TrainConfig.from_args(args)
    if opts.data is None:
        raise TrainError("--data is required to train: the conversations to train on (e.g. self-distilled)")
    if not opts.data.is_file():  # before anything is loaded
        what = "not a file" if opts.data.exists() else "no such file"
        raise TrainError(f"--data {opts.data}: {what} (the conversations to train on, e.g. the recipe's "
                         "self-distilled DATA)")
    model = args.model or DEFAULT_MODEL
    model_dir = resolve_model(model)
    if Path(model).expanduser().exists():  # a path is recorded absolute: the heads must find it from anywhere
        model = str(model_dir)
    check_out(opts.out)
    identity = run_identity(model_dir, opts, backbone, cfg)
    done = finished_metrics(opts.out, identity)
    refuse_other_finished_run(opts.out, identity, done)
    if done is not None:
        log.info("the heads in %s are already trained on this data, model and settings (metrics.json): nothing "
                 "to do (train into a new --out to start over)", opts.out)
        return done
    prepared = prepare_data(model_dir, opts, cfg, backbone)
    metrics = trainer(model_dir, prepared, cfg, opts.out, model)
    return record_metrics(opts.out, metrics, identity, prepared)


def evaluate_only(args: argparse.Namespace, backbone: Backbone, measure: Measure) -> dict:
    """Held-out metrics of the heads in ``--out``: data, cache, model and backbone default to the ones
    their ``metrics.json`` and ``config.json`` record."""
    recorded = read_metrics(args.out)
    opts = DataOptions.from_args(args, recorded)
    model_dir = resolve_model(args.model or heads_base_model(opts.out) or DEFAULT_MODEL)
    cfg = TrainConfig.from_args(args)
    if not args.fp32 and "bf16" in recorded.get("training", {}):  # measured in the precision it was trained in
        cfg = replace(cfg, bf16=recorded["training"]["bf16"])
    config, state, vocab, cfg = eval_setup(opts.out, cfg)
    split = eval_split(model_dir, opts, recorded_backbone(backbone, recorded))
    metrics = measure(model_dir, TokenData(split, cfg.num_heads, vocab), config, state, vocab, cfg)
    write_eval_metrics(opts.out, metrics)
    return metrics


def heads_base_model(heads_dir: Path) -> Optional[str]:
    """The base model the heads' ``config.json`` names (``base_model_name_or_path``), if any."""
    try:
        name = json.loads((heads_dir / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return None
    if name:
        log.info("model: %s (the heads' base model)", name)
    return name or None


def recorded_backbone(backbone: Backbone, recorded: dict[str, Any]) -> Backbone:
    """The backbone the heads were trained on, as recorded; one of another framework than this
    trainer's can only reuse its cache (filling it is refused with the command that can)."""
    framework = recorded.get("backbone", backbone.framework)
    if framework == backbone.framework:
        return backbone
    module = "medusa_jittor_all.train" if framework == "jittor" else "medusa.train"

    def refuse(model_dir: Path) -> HiddenFn:
        raise TrainError(f"these heads were trained on the {framework} backbone's hidden states, whose cache is "
                         f"incomplete here: evaluate them with python -m {module} --eval-only")

    return Backbone(refuse, framework, recorded.get("backbone_dtype", backbone.dtype))


def eval_split(model_dir: Path, opts: DataOptions, backbone: Backbone) -> Path:
    """The held-out split's cache: (re)built from the data when it is here, else the recorded cache."""
    if opts.data is not None and opts.data.is_file():
        return cache_splits(model_dir, opts, backbone, ("eval",)) / "eval"
    recorded = opts.cache_dir / "eval" if opts.cache_dir is not None else None
    if recorded is not None and read_meta(recorded) is not None:
        log.info("evaluating on the cached held-out split %s (its data %s is not here)", recorded, opts.data)
        return recorded
    if opts.data is None:
        raise TrainError(f"{opts.out / METRICS_FILE} does not say what these heads were trained on: pass --data "
                         "(and --model, --max-length as in training)")
    raise TrainError(f"--data {opts.data}: no such file, and no cache of it: pass the conversations the heads "
                     "were trained on")


def backbone_dtype(args: argparse.Namespace) -> str:
    """``--backbone-dtype``, else (``--eval-only``) the one the heads were trained with, else bfloat16."""
    recorded = read_metrics(args.out) if args.eval_only else {}
    return args.backbone_dtype or (recorded.get("backbone_dtype") if recorded.get("backbone") == "torch" else None) \
        or "bfloat16"


# --- PyTorch -------------------------------------------------------------------------------------

def train_torch(model_dir: Path, prepared: Prepared, cfg: TrainConfig, out: Path, base_model: str) -> dict:
    heads, lm_head = fresh_heads(model_dir, cfg, prepared.vocab_ids)
    return train(heads, lm_head, prepared.splits["train"], prepared.splits["eval"], cfg, out, base_model,
                 base_embedding(model_dir, cfg.head_type))


def torch_measure(device: str) -> Measure:
    def measure(model_dir: Path, data: TokenData, config: MedusaConfig, state: dict,
                vocab: Optional[np.ndarray], cfg: TrainConfig) -> dict:
        where = rank_device(device)
        weight = torch.from_numpy(base_lm_head(model_dir))
        heads = heads_from_state(config, state, weight.shape[1], weight.shape[0], torch.float32, where)
        embed = base_embedding(model_dir, config.head_type)
        return evaluate(HeadsWithBase(heads, lm_head_rows(weight, vocab).to(where),
                                      None if embed is None else embed.to(where)), data, cfg)

    return measure


def start_processes() -> None:
    """Join the process group of ``accelerate launch`` / ``torchrun`` (a no-op for one process) with a
    timeout long enough for the other ranks to wait out the cache.  Ranks run on the CPU when
    there is no GPU or ``ACCELERATE_USE_CPU`` is set (accelerate's own rule, which a bare
    ``PartialState()`` would not apply: the ranks would each train alone)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    PartialState(cpu=cpu, timeout=CACHE_WAIT)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file INFO lines drown ours


def report(metrics: dict, out: Path) -> None:
    """The held-out accuracies and one line saying where everything is (no raw JSON on the console)."""
    if "top1" not in metrics:
        return
    log.info("held-out top-1 per head: %s", [round(a, 3) for a in metrics["top1"]])
    log.info("held-out top-5 per head: %s", [round(a, 3) for a in metrics["top5"]])
    trained = f", trained on {metrics['train_positions']} positions" if "train_positions" in metrics else ""
    log.info("heads in %s%s; metrics in %s", out, trained, out / METRICS_FILE)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start_processes()
    backbone = torch_backbone(backbone_dtype(args), args.device)
    metrics = train_or_evaluate(args, backbone, train_torch, torch_measure(args.device))
    report(metrics, args.out)
    return metrics


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: errors a user can fix are one log line and exit status 2."""
    try:
        main(argv)
    except ValueError as err:  # TrainError, ModelError, CheckpointError, JsonlError...
        logging.getLogger("medusa.train").error("%s", err)
        return 2
    return 0
