"""Medusa head checkpoints in the original FasterDecoding format, as numpy state dicts.

A checkpoint is a directory with ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``,
``base_model_name_or_path``) and ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` holding the
state dict of the original ``nn.ModuleList`` of heads::

    {i}.{j}.linear.weight  [h, h]   ResBlock j of head i   (j < L)
    {i}.{j}.linear.bias    [h]
    {i}.{L}.weight         [V, h]   head i's own lm_head   (absent in the shared-lm_head layout)

Head and layer counts are inferred from the keys and must agree with ``config.json``; loading is
strict, so a truncated or foreign file fails with one line saying what is wrong.  Both the
original per-head-lm_head layout and the legacy ResBlock-only layout (heads share the base
model's lm_head) are read and written.  Writes are atomic: a crash never leaves half a file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .config import MedusaConfig

CONFIG_NAME = "config.json"
WEIGHTS_SAFETENSORS = "medusa_lm_head.safetensors"
WEIGHTS_PT = "medusa_lm_head.pt"

_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")

StateDict = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A Medusa checkpoint that is missing, malformed or does not fit the base model."""


def head_keys(num_heads: int, num_layers: int, shared_lm_head: bool) -> list[str]:
    """Every key a checkpoint of this shape holds, in order."""
    keys = []
    for i in range(num_heads):
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


def infer_layout(state: StateDict) -> tuple[int, int, bool]:
    """(num_heads, num_layers, shared_lm_head) from the keys alone; raises on foreign keys."""
    bad = [k for k in state if not _KEY.match(k)]
    if bad:
        raise CheckpointError(f"unexpected key {bad[0]!r}: not a Medusa head checkpoint")
    if not state:
        raise CheckpointError("the checkpoint holds no tensors")
    parsed = [_KEY.match(k).groups() for k in state]  # type: ignore[union-attr]
    num_heads = 1 + max(int(i) for i, _, _ in parsed)
    num_layers = 1 + max(int(j) for _, j, kind in parsed if kind != "weight") if any(
        kind != "weight" for _, _, kind in parsed) else 0
    shared = not any(kind == "weight" for _, _, kind in parsed)
    expected = head_keys(num_heads, num_layers, shared)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in set(expected)]
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CheckpointError(f"inconsistent Medusa checkpoint ({what}) for {num_heads} heads x {num_layers} layers")
    return num_heads, num_layers, shared


def check_shapes(state: StateDict, hidden_size: int, vocab_size: int) -> None:
    """Raise CheckpointError unless every tensor fits a base model of this hidden size and vocab."""
    for key, value in state.items():
        kind = _KEY.match(key).group(3)  # type: ignore[union-attr]
        want = {"linear.weight": (hidden_size, hidden_size), "linear.bias": (hidden_size,),
                "weight": (vocab_size, hidden_size)}[kind]
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"head tensor {key} has shape {tuple(value.shape)}, the base model needs {want} "
                f"(hidden size {hidden_size}, vocab {vocab_size}): these heads belong to another model"
            )


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[MedusaConfig, StateDict]:
    """Read a checkpoint directory; counts come from the keys and must match config.json."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"Medusa heads {root}: no such directory (expected config.json + {WEIGHTS_SAFETENSORS})")
    state = _read_weights(root)
    num_heads, num_layers, shared = infer_layout(state)
    raw = _read_config(root)
    for name, inferred in (("medusa_num_heads", num_heads), ("medusa_num_layers", num_layers)):
        if name in raw and int(raw[name]) != inferred:
            raise CheckpointError(f"{root}/{CONFIG_NAME} says {name}={raw[name]} but the weights hold {inferred}")
    config = MedusaConfig(
        medusa_num_heads=num_heads,
        medusa_num_layers=num_layers,
        base_model_name_or_path=str(raw.get("base_model_name_or_path", "")),
        shared_lm_head=shared,
        tree=raw.get("tree"),
        token_map=raw.get("token_map"),
    )
    return config, state


def save_checkpoint(path: str | os.PathLike[str], config: MedusaConfig, state: StateDict,
                    fmt: str = "safetensors", extra: Optional[dict[str, Any]] = None) -> Path:
    """Write config.json + weights atomically; ``fmt`` is ``safetensors`` or ``pt`` (needs torch)."""
    num_heads, num_layers, shared = infer_layout(state)
    if (num_heads, num_layers, shared) != (config.medusa_num_heads, config.medusa_num_layers, config.shared_lm_head):
        raise CheckpointError("config does not describe the state dict being saved")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        _atomic(root / WEIGHTS_SAFETENSORS, lambda tmp: save_file(arrays, tmp))
    elif fmt == "pt":
        import torch

        _atomic(root / WEIGHTS_PT, lambda tmp: torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}: use safetensors or pt")
    body = {k: v for k, v in asdict(config).items() if v is not None}
    body.update(extra or {})
    atomic_write_text(root / CONFIG_NAME, json.dumps(body, indent=2) + "\n")
    return root


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    _atomic(path, write)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_config(root: Path) -> dict[str, Any]:
    file = root / CONFIG_NAME
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
        if st.is_file():
            from safetensors.numpy import load_file

            return {k: v.astype(np.float32, copy=False) for k, v in load_file(str(st)).items()}
        if pt.is_file():
            return _read_pt(pt)
    except CheckpointError:
        raise
    except Exception as err:  # any decoder error means the file is corrupt; say which file
        raise CheckpointError(f"cannot read {st if st.is_file() else pt}: corrupt or truncated ({err})") from err
    raise CheckpointError(f"{root} has neither {WEIGHTS_SAFETENSORS} nor {WEIGHTS_PT}")


def _read_pt(file: Path) -> StateDict:
    import torch  # only the legacy pickle format needs torch

    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return {k: v.float().numpy() for k, v in state.items()}
