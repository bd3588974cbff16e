"""Shared fixtures: a tiny random Llama (unit tests), the embedded SmolLM2 (slow tests), and the
device a device-path test runs on; and the rule that CI hides no gap behind a skip.

Devices: a test that takes ``device`` (or ``jt_device``, ``smol_on_device``) runs once on "cpu" and
once on "cuda".  Without CUDA the cuda run is skipped with a reason starting "needs CUDA", or, under
``CI=true`` (CI has no GPU), deselected, so that a CI run reports no skip at all.

No hidden skips: under ``CI=true`` (CI installs everything) any other skip, a module whose framework
failed to import or a missing browser, is reported as a failure.  Locally a skip names what to install.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

CI = os.environ.get("CI", "").lower() == "true"
NEEDS_CUDA = "needs CUDA"  # the one skip reason CI tolerates: it has no GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without CUDA: deselect the cuda runs under CI, skip them (saying why) elsewhere."""
    if torch.cuda.is_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if CI:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
        return
    for item in cuda:
        item.add_marker(pytest.mark.skip(reason=f"{NEEDS_CUDA}: torch.cuda.is_available() is False here"))


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def _fail_hidden_skip(report: Any) -> Any:
    """Under CI=true a skip (other than a CUDA one) becomes a failure that names its reason."""
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if NEEDS_CUDA not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    return _fail_hidden_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    return _fail_hidden_skip((yield))  # a module-level skip (importorskip) happens at collection


def import_jittor_or_skip() -> Any:
    """``jt`` (configured by ``medusa_jittor.runtime``), or a module-level skip saying what to install."""
    try:
        return importlib.import_module("medusa_jittor.runtime").jt
    except ImportError as err:
        pytest.skip(f"Jittor does not import ({err}): pip install -r requirements.txt "
                    "(jittor==1.3.11.0 and jittor-offline)", allow_module_level=True)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def jt_device(device: str):
    """Jittor runs on ``device`` for the test (``jt.flags.use_cuda``); its CUDA needs its own toolchain."""
    from medusa_jittor.runtime import cuda_driver_present, jt

    if device == "cuda" and not (jt.has_cuda and cuda_driver_present()):
        pytest.skip(f"{NEEDS_CUDA} in Jittor: it found no usable nvcc/driver (jt.has_cuda is False)")
    with jt.flag_scope(use_cuda=int(device == "cuda")):
        yield device


def make_hf_model(path: Path, model_type: str = "llama", tokenizer_from: Path | None = None, **overrides):
    """Save a tiny random HF decoder of ``model_type`` to ``path`` and return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    params.update(overrides)
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for f in tokenizer_from.glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, path / f.name)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model(path)
    return path


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from medusa.core.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_backend():
    from medusa.backend import TorchBackend

    return TorchBackend(dtype="float32", device="cpu")


@pytest.fixture(scope="session", params=DEVICES)
def smol_on_device(request: pytest.FixtureRequest):
    """The SmolLM2 torch backend (fp32) on each device; the CPU one is ``smol_backend`` itself."""
    if request.param == "cpu":
        return request.getfixturevalue("smol_backend")
    from medusa.backend import TorchBackend

    return TorchBackend(dtype="float32", device=request.param)
