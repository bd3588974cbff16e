"""Medusa head checkpoints as FasterDecoding publishes them, as numpy state dicts.

Medusa-1 heads are a directory with ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``,
``base_model_name_or_path``) and ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` holding the
state dict of the original ``nn.ModuleList`` of heads::

    {i}.{j}.linear.weight  [h, h]   ResBlock j of head i   (j < L)
    {i}.{j}.linear.bias    [h]
    {i}.{L}.weight         [V, h]   head i's own lm_head   (absent in the shared-lm_head layout)

Hydra heads (``head_type: "hydra"``) add one input projection per head, which reads the hidden
state and the embeddings of the i + 1 tokens before head i's target (root first)::

    {i}.proj.weight        [h, (i+2)h]
    {i}.proj.bias          [h]

A Medusa-2 checkpoint is one model directory: the backbone plus the same tensors under
``medusa_head.`` inside the model's own shards, the counts in its ``config.json`` (top level,
nested under ``"medusa"``, or in ``medusa_config.json``).

Head and layer counts come from the weights.  Published configs are not always right (the
FasterDecoding Vicuna heads say ``medusa_num_heads: 2`` and hold 5; upstream hard-codes 5), so a
config that disagrees gets one warning naming both numbers, never a refusal.  Keys are read
strictly: a truncated or foreign file fails with one line saying what is wrong.  Both the
per-head-lm_head layout and the ResBlock-only layout (heads share the base model's lm_head) are
read and written.  Writes are atomic: a crash never leaves half a file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .config import MedusaConfig
from .io import atomic_write, atomic_write_text
from .weights import NON_BACKBONE_PREFIXES, read_safetensors, read_tensors, tensor_files

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MEDUSA_CONFIG_NAME = "medusa_config.json"  # a Medusa config written beside a model's own config.json
WEIGHTS_SAFETENSORS = "medusa_lm_head.safetensors"
WEIGHTS_PT = "medusa_lm_head.pt"
MEDUSA2_PREFIX = NON_BACKBONE_PREFIXES[0]  # "medusa_head.": the heads' prefix in a Medusa-2 model

# config.json fields that describe heads; nested under "medusa" they may drop the prefix
MEDUSA_FIELDS = ("medusa_num_heads", "medusa_num_layers", "base_model_name_or_path", "shared_lm_head", "tree",
                 "token_map", "head_type")
_NESTED_ALIASES = {"num_heads": "medusa_num_heads", "num_layers": "medusa_num_layers"}

_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_PROJ = re.compile(r"^(\d+)\.proj\.(weight|bias)$")  # hydra heads only

StateDict = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A Medusa checkpoint that is missing, malformed or does not fit the base model."""


def head_keys(num_heads: int, num_layers: int, shared_lm_head: bool, hydra: bool = False) -> list[str]:
    """Every key a checkpoint of this shape holds, in order."""
    keys = []
    for i in range(num_heads):
        if hydra:
            keys += [f"{i}.proj.weight", f"{i}.proj.bias"]
        for j in range(num_layers):
            keys += [f"{i}.{j}.linear.weight", f"{i}.{j}.linear.bias"]
        if not shared_lm_head:
            keys.append(f"{i}.{num_layers}.weight")
    return keys


def build_head_modules(nn: Any, res_block: Callable[[int], Any], config: MedusaConfig, hidden_size: int,
                       vocab_size: int) -> list[Any]:
    """The module tree whose parameter names are the checkpoint keys, for any framework.

    ``nn`` is the framework's namespace (``torch.nn`` or ``jittor.nn``): one Sequential per head of
    ``medusa_num_layers`` distinct ResBlocks, plus its own ``Linear(h, V)`` unless the lm_head is shared.
    """
    heads = []
    for _ in range(config.medusa_num_heads):
        blocks = [res_block(hidden_size) for _ in range(config.medusa_num_layers)]
        if not config.shared_lm_head:
            blocks.append(nn.Linear(hidden_size, vocab_size, bias=False))
        heads.append(nn.Sequential(*blocks))
    return heads


def is_hydra(state: StateDict) -> bool:
    """Whether ``state`` holds Hydra heads (input projections, see the module docstring)."""
    return any(_PROJ.match(k) for k in state)


def infer_layout(state: StateDict) -> tuple[int, int, bool]:
    """(num_heads, num_layers, shared_lm_head) from the keys alone; raises on foreign keys."""
    bad = [k for k in state if not (_KEY.match(k) or _PROJ.match(k))]
    if bad:
        raise CheckpointError(f"unexpected key {bad[0]!r}: not a Medusa head checkpoint")
    if not state:
        raise CheckpointError("the checkpoint holds no tensors")
    hydra = is_hydra(state)
    parsed = [_KEY.match(k).groups() for k in state if _KEY.match(k)]  # type: ignore[union-attr]
    if not parsed:
        raise CheckpointError("the checkpoint holds input projections but no heads")
    num_heads = 1 + max(int(i) for i, _, _ in parsed)
    num_layers = 1 + max(int(j) for _, j, kind in parsed if kind != "weight") if any(
        kind != "weight" for _, _, kind in parsed) else 0
    shared = not any(kind == "weight" for _, _, kind in parsed)
    expected = head_keys(num_heads, num_layers, shared, hydra)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in set(expected)]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CheckpointError(f"inconsistent Medusa checkpoint ({what}) for {num_heads} heads x {num_layers} layers")
    return num_heads, num_layers, shared


def check_shapes(state: StateDict, hidden_size: int, vocab_size: int) -> None:
    """Raise CheckpointError unless every tensor fits a base model of this hidden size and vocab."""
    for key, value in state.items():
        proj = _PROJ.match(key)
        if proj:
            head, kind = int(proj.group(1)), proj.group(2)
            want = (hidden_size, (head + 2) * hidden_size) if kind == "weight" else (hidden_size,)
        else:
            kind = _KEY.match(key).group(3)  # type: ignore[union-attr]
            want = {"linear.weight": (hidden_size, hidden_size), "linear.bias": (hidden_size,),
                    "weight": (vocab_size, hidden_size)}[kind]
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"head tensor {key} has shape {tuple(value.shape)}, the base model needs {want} "
                f"(hidden size {hidden_size}, vocab {vocab_size}): these heads belong to another model"
            )


def describe_heads(config: MedusaConfig) -> dict[str, Any]:
    """What a run reports about its heads (the bench's ``describe()``)."""
    return {"num_heads": config.medusa_num_heads, "num_layers": config.medusa_num_layers,
            "head_type": config.head_type, "shared_lm_head": config.shared_lm_head}


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[MedusaConfig, StateDict]:
    """Heads as published: a Medusa-1 heads directory, or a Medusa-2 model directory (heads inside
    the model's weights).  Counts and layout come from the weights; see ``config_for``."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"Medusa heads {root}: no such directory (expected config.json + {WEIGHTS_SAFETENSORS})")
    if not (root / WEIGHTS_SAFETENSORS).is_file() and not (root / WEIGHTS_PT).is_file():
        found = medusa2_heads(root)
        if found is not None:
            return found
    state = _strip_prefix(_read_weights(root), MEDUSA2_PREFIX)
    return config_for(state, _read_config(root), root / CONFIG_NAME), state


def config_for(state: StateDict, raw: dict[str, Any], where: Path, base_model: Optional[str] = None) -> MedusaConfig:
    """The config of ``state``: counts and layout from its keys, the rest from the config dict
    ``raw`` (read from ``where``); disagreements are warned about, an unknown head type refused."""
    num_heads, num_layers, shared = infer_layout(state)
    fields = medusa_fields(raw)
    _warn_disagreements(fields, num_heads, num_layers, shared, where)
    head_type = str(fields.get("head_type", "hydra" if is_hydra(state) else "medusa"))
    if (head_type == "hydra") != is_hydra(state):
        held = "Hydra input projections" if is_hydra(state) else "no Hydra input projections"
        raise CheckpointError(f"{where}: head_type is {head_type!r} but the weights hold {held}")
    try:
        return MedusaConfig(
            medusa_num_heads=num_heads,
            medusa_num_layers=num_layers,
            base_model_name_or_path=str(base_model if base_model is not None
                                        else fields.get("base_model_name_or_path", "")),
            shared_lm_head=shared,
            tree=fields.get("tree"),
            token_map=fields.get("token_map"),
            head_type=head_type,
        )
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from err


def medusa_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The head fields of a config dict, top level or nested under ``"medusa"`` (nested wins)."""
    out = {k: raw[k] for k in MEDUSA_FIELDS if k in raw}
    nested = raw.get("medusa")
    if isinstance(nested, dict):
        renamed = {_NESTED_ALIASES.get(k, k): v for k, v in nested.items()}
        out.update({k: v for k, v in renamed.items() if k in MEDUSA_FIELDS})
    return out


def _warn_disagreements(fields: dict[str, Any], num_heads: int, num_layers: int, shared: bool, where: Path) -> None:
    counts = (("medusa_num_heads", num_heads), ("medusa_num_layers", num_layers))
    said = [f"{name}={fields[name]}" for name, held in counts
            if name in fields and _as_int(fields[name], name, where) != held]
    if said:
        log.warning("%s says %s but the weights hold %d heads x %d layers: using the weights' counts",
                    where, " and ".join(said), num_heads, num_layers)
    if "shared_lm_head" in fields and bool(fields["shared_lm_head"]) != shared:
        log.warning("%s says shared_lm_head=%s but the weights hold %s: following the weights", where,
                    fields["shared_lm_head"], "no per-head lm_heads" if shared else "per-head lm_heads")


def _as_int(value: Any, name: str, where: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: {name} must be an integer, not {value!r}") from None


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Heads saved from a model (``medusa_head.0.0.linear.weight``) rather than from the heads."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def medusa2_tensors(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``medusa_head.*`` tensor names of a model directory -> their shard, from the shard index or the
    safetensors headers (no tensor is read); empty when the directory holds no model weights."""
    root = Path(model_dir)
    try:
        names = tensor_files(root)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{root}: cannot list the model's tensors ({err})") from err
    return {k: f for k, f in names.items() if k.startswith(MEDUSA2_PREFIX)}


def is_medusa2(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` is a Medusa-2 checkpoint: a model whose weights also hold the heads."""
    return Path(model_dir).is_dir() and bool(medusa2_tensors(model_dir))


def medusa2_heads(model_dir: str | os.PathLike[str]) -> Optional[tuple[MedusaConfig, StateDict]]:
    """The heads inside a Medusa-2 model directory, or None when its weights hold none.  The backbone
    is not read; the heads' base model is the directory itself (Medusa-2 tunes both together)."""
    root = Path(model_dir)
    files = medusa2_tensors(root) if root.is_dir() else {}
    if not files:
        return None
    try:
        tensors = read_tensors(files)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read the Medusa-2 heads of {root}: corrupt or truncated ({err})") from err
    state = {k[len(MEDUSA2_PREFIX):]: np.array(v, dtype=np.float32) for k, v in tensors.items()}
    raw, where = dict(_read_config(root)), root / CONFIG_NAME
    if (root / MEDUSA_CONFIG_NAME).is_file():
        raw, where = dict(raw, **_read_config(root, MEDUSA_CONFIG_NAME)), root / MEDUSA_CONFIG_NAME
    return config_for(state, raw, where, base_model=str(root)), state


def check_base_model(config: MedusaConfig, model: str, model_dir: Optional[Path] = None) -> bool:
    """Warn when the heads name another base model than ``model`` (its name or directory); returns
    whether they agree.  Only a warning: ``check_shapes`` decides whether the heads fit."""
    base = config.base_model_name_or_path
    want = _stem(base)
    names = {_stem(model)}
    if model_dir is not None:
        names.add(_stem(str(model_dir)))
        # a hub snapshot: .../models--org--name/snapshots/<hash>
        names.update(part.split("--")[-1].lower() for part in Path(model_dir).parts if part.startswith("models--"))
    if not base or any(n == want or n.startswith(want + "-") for n in names):
        return True
    log.warning("these heads were trained for %s, not %s: loading them since their shapes fit", base, model)
    return False


def _stem(name: str) -> str:
    return Path(name.rstrip("/")).name.lower()


def save_checkpoint(path: str | os.PathLike[str], config: MedusaConfig, state: StateDict,
                    fmt: str = "safetensors", extra: Optional[dict[str, Any]] = None) -> Path:
    """Write config.json + weights atomically; ``fmt`` is ``safetensors`` or ``pt`` (needs torch)."""
    num_heads, num_layers, shared = infer_layout(state)
    if (num_heads, num_layers, shared, is_hydra(state)) != (config.medusa_num_heads, config.medusa_num_layers,
                                                            config.shared_lm_head, config.head_type == "hydra"):
        raise CheckpointError("config does not describe the state dict being saved")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        atomic_write(root / WEIGHTS_SAFETENSORS, lambda tmp: save_file(arrays, tmp))
    elif fmt == "pt":
        import torch

        atomic_write(root / WEIGHTS_PT, lambda tmp: torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}: use safetensors or pt")
    stale = root / (WEIGHTS_PT if fmt == "safetensors" else WEIGHTS_SAFETENSORS)
    stale.unlink(missing_ok=True)  # the loader prefers safetensors: an old file must not shadow the new one
    body = {k: v for k, v in asdict(config).items() if v is not None}
    body.update(extra or {})
    atomic_write_text(root / CONFIG_NAME, json.dumps(body, indent=2) + "\n")
    return root


def _read_config(root: Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    file = root / name
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return raw


def _read_weights(root: Path) -> StateDict:
    st, pt = root / WEIGHTS_SAFETENSORS, root / WEIGHTS_PT
    try:
        if st.is_file():  # our reader: published heads may be BF16, which numpy's safetensors cannot load
            return {k: np.array(v, dtype=np.float32) for k, v in read_safetensors(st).items()}
        if pt.is_file():
            return _read_pt(pt)
    except CheckpointError:
        raise
    except Exception as err:  # any decoder error means the file is corrupt; say which file
        raise CheckpointError(f"cannot read {st if st.is_file() else pt}: corrupt or truncated ({err})") from err
    raise CheckpointError(f"{root} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_PT} "
                          f"(nor {MEDUSA2_PREFIX}* tensors in model weights)")


def _read_pt(file: Path) -> StateDict:
    import torch  # only the legacy pickle format needs torch

    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return {k: v.float().numpy() for k, v in state.items()}
