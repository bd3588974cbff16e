"""GPU readiness check (issue 12): every backend x {baseline, Medusa} on a tiny random model and on
SmolLM2, greedy equality (Medusa's tokens must be the baseline's), a 20-step training run, a table
of tokens/s, and the CUDA runs of the test suite's device-parametrised tests.  Run it through
``scripts/gpu_check.sh``, which picks the Python.

Why a script and not tests: CI has no GPU; this is what a GPU session runs once, in minutes, to
learn whether the CUDA paths work and how fast they are.

Knobs (environment):
  DEVICE    cuda | cpu (default: cuda when PyTorch sees one, else cpu)
  QUICK=1   the tiny model only, one short prompt: a CPU dry run of the whole script
  DTYPES    torch and hybrid dtypes (default: float16,bfloat16 on CUDA, float32 on CPU); Jittor runs float32
  BACKENDS  subset of torch,hybrid,jittor (default: all three)
  SMOLLM2   the real model (default: smollm2-135m; any local HF directory of a Llama-family model)
  OUT       folder for the raw JSON (default: results/gpu_check/)

A backend that cannot run here (Jittor without its CUDA toolchain, SmolLM2's package missing) is
reported as unavailable with the reason; exit status 1 means a check failed: outputs that differ,
an error, or a training run that did not finish.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from medusa.core.backends import BackendError, load_backend
from medusa.core.config import GenerationConfig
from medusa.core.engine import generate_ids
from medusa.core.models import ModelError, resolve_model
from medusa.core.prompts import encode_prompt, stop_token_ids

PROMPTS = ["Write a short poem about the sea.", "What is 17 * 23? Explain step by step.",
           "Give me three tips for learning Python."]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TRAIN_STEPS = 20


@dataclass(frozen=True)
class Plan:
    device: str
    quick: bool
    dtypes: tuple[str, ...]
    backends: tuple[str, ...]
    real_model: str
    out_dir: Path

    @classmethod
    def from_env(cls) -> "Plan":
        device = os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        default_dtypes = "float16,bfloat16" if device.startswith("cuda") else "float32"
        out = os.environ.get("OUT")
        return cls(device=device, quick=os.environ.get("QUICK", "0") not in ("0", ""),
                   dtypes=tuple(os.environ.get("DTYPES", default_dtypes).split(",")),
                   backends=tuple(os.environ.get("BACKENDS", "torch,hybrid,jittor").split(",")),
                   real_model=os.environ.get("SMOLLM2", "smollm2-135m"),
                   out_dir=Path(out) / "gpu_check" if out else Path("results") / "gpu_check")


@dataclass
class Row:
    """One backend x model x dtype x arm: its speed and whether Medusa kept the baseline's tokens."""

    model: str
    backend: str
    dtype: str
    arm: str
    status: str  # ok | MISMATCH | ERROR | unavailable
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    reason: str = ""
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class ModelSpec:
    model: str  # as --model takes it
    heads: Optional[str]  # as --medusa-heads takes it (None: the model's shipped heads)
    directory: Optional[Path]  # None: not available here ...
    reason: str = ""  # ... and why


# ----------------------------------------------------------------------------- the tiny model


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 2 ChatML markers, no merges) with a chat template: the
    tiny model needs no downloaded vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def tiny_model(path: Path) -> Path:
    """A random 2-layer Llama (GQA) in Hugging Face layout, with ``byte_tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- decoding


def run_arms(backend: Any, prompts: list[list[int]], max_new: int, label: dict[str, str]) -> list[Row]:
    """Baseline then Medusa over ``prompts`` (after one untimed warm-up of each); Medusa's row says
    MISMATCH when any of its outputs differs from the baseline's."""
    cfg = GenerationConfig(max_new_tokens=max_new, stop_token_ids=stop_token_ids(backend.tokenizer))
    for medusa in (False, True):  # warm-up: compilation, allocator, caches
        generate_ids(backend.decoder, prompts[0], cfg.with_(medusa=medusa, max_new_tokens=16))
    rows = []
    for arm in ("baseline", "medusa"):
        arm_cfg = cfg.with_(medusa=arm == "medusa")
        row = Row(**label, arm=arm, status="ok")
        for ids in prompts:
            backend.synchronize()
            start = time.perf_counter()
            out, steps = generate_ids(backend.decoder, ids, arm_cfg)
            backend.synchronize()
            row.seconds += time.perf_counter() - start
            row.tokens, row.steps = row.tokens + len(out), row.steps + len(steps)
            row.outputs.append(out)
        rows.append(row)
    base, med = rows
    if med.outputs != base.outputs:
        first = next(i for i, (a, b) in enumerate(zip(med.outputs, base.outputs)) if a != b)
        med.status, med.reason = "MISMATCH", f"prompt {first}: Medusa's tokens differ from the baseline's"
    return rows


def check_backend(name: str, model: str, spec: ModelSpec, dtype: str, plan: Plan, texts: list[str],
                  max_new: int) -> list[Row]:
    label = {"model": model, "backend": name, "dtype": dtype}
    try:
        backend = load_backend(name, model=spec.model, heads=spec.heads, dtype=dtype, device=plan.device, max_len=1024)
    except (ImportError, BackendError) as err:  # not installed here, or no CUDA in that framework
        return [Row(**label, arm="-", status="unavailable", reason=f"{name} {plan.device}: {err}")]
    try:
        prompts = [encode_prompt(backend.tokenizer, [{"role": "user", "content": t}]) for t in texts]
        return run_arms(backend, prompts, max_new, label)
    except Exception as err:  # noqa: BLE001 - a broken path is a finding to report, not a reason to stop
        return [Row(**label, arm="-", status="ERROR", reason=f"{type(err).__name__}: {err}")]
    finally:
        del backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def dtypes_for(backend: str, plan: Plan) -> tuple[str, ...]:
    return ("float32",) if backend == "jittor" else plan.dtypes


def model_specs(plan: Plan, tiny: Path) -> dict[str, ModelSpec]:
    specs = {"tiny-random": ModelSpec(str(tiny), "fresh", tiny)}
    if not plan.quick:
        try:
            specs["smollm2"] = ModelSpec(plan.real_model, None, resolve_model(plan.real_model))
        except ModelError as err:
            specs["smollm2"] = ModelSpec(plan.real_model, None, None, f"smollm2: {err}")
    return specs


def check_models(plan: Plan, specs: dict[str, ModelSpec]) -> list[Row]:
    texts = PROMPTS[:1] if plan.quick else PROMPTS
    max_new = 32 if plan.quick else 128
    rows = []
    for model, spec in specs.items():
        if spec.directory is None:
            rows.append(Row(model, "-", "-", "-", "unavailable", reason=spec.reason))
            continue
        for name in plan.backends:
            for dtype in dtypes_for(name, plan):
                new = check_backend(name, model, spec, dtype, plan, texts, max_new)
                print("\n".join(format_row(r) for r in new), flush=True)
                rows += new
    return rows


# ----------------------------------------------------------------------------- training


def training_data(path: Path) -> Path:
    convs = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Count from {i} to {i + 9}."},
        {"from": "gpt", "value": ", ".join(str(i + k) for k in range(10))}]} for i in range(24)]
    path.write_text(json.dumps(convs))
    return path


def check_training(model_dir: Path, plan: Plan, work: Path) -> dict[str, Any]:
    """``python -m medusa.train`` for TRAIN_STEPS optimiser steps on ``plan.device``."""
    out = work / "heads"
    data = training_data(work / "c.json")
    cmd = [sys.executable, "-m", "medusa.train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
           "--cache-dir", str(work / "cache"), "--max-length", "96", "--eval-fraction", "0.2", "--epochs", "50",
           "--batch-tokens", "128", "--num-heads", "2", "--max-steps", str(TRAIN_STEPS), "--device", plan.device]
    start = time.perf_counter()
    result: dict[str, Any] = {"model": model_dir.name, "device": plan.device}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired:
        return dict(result, seconds=time.perf_counter() - start, status="ERROR", reason="no end within 480 s")
    result.update(seconds=time.perf_counter() - start, returncode=run.returncode)
    metrics = out / "metrics.json"
    if run.returncode != 0 or not metrics.is_file():
        return dict(result, status="ERROR", reason=(run.stderr or run.stdout)[-2000:])
    result["metrics"] = json.loads(metrics.read_text())
    steps = result["metrics"].get("steps")
    if steps != TRAIN_STEPS:
        return dict(result, status="ERROR", reason=f"the run stopped at step {steps}, not {TRAIN_STEPS}")
    return dict(result, status="ok")


# ----------------------------------------------------------------------------- the test suite's CUDA runs

DEVICE_TESTS = ["tests/test_llama.py", "tests/test_decoding.py", "tests/test_hybrid.py", "tests/test_jittor_all.py"]


def check_device_tests(with_smollm2: bool) -> dict[str, Any]:
    """The suite's device-parametrised tests, CUDA runs only (``-m cuda``; all skipped without CUDA)."""
    files = DEVICE_TESTS + (["tests/test_smollm2.py"] if with_smollm2 else [])
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "cuda", "-p", "no:cacheprovider", *files]
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"status": "ERROR", "seconds": time.perf_counter() - start, "summary": "no end within 300 s"}
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return {"status": "ok" if run.returncode in (0, 5) else "ERROR", "seconds": time.perf_counter() - start,
            "summary": lines[-1] if lines else run.stderr[-500:], "output": run.stdout[-6000:]}


# ----------------------------------------------------------------------------- report


def format_row(r: Row) -> str:
    if r.status in ("unavailable", "ERROR") and r.arm == "-":
        return f"{r.model:<14}{r.backend:<8}{r.dtype:<10}{'':<10}{r.status}: {r.reason[:200]}"
    tau = r.tokens / r.steps if r.steps else 0.0
    return (f"{r.model:<14}{r.backend:<8}{r.dtype:<10}{r.arm:<10}{r.tokens:>7}{r.seconds:>9.2f}"
            f"{r.tokens_per_s:>10.1f}{tau:>7.2f}  {r.status}{': ' + r.reason if r.reason else ''}")


def format_training(t: dict[str, Any]) -> str:
    if t["status"] != "ok":
        return f"training {t['model']}: {t['status']} on {t['device']} after {t['seconds']:.1f} s: {t['reason'][-800:]}"
    tps = t["metrics"].get("train_tokens_per_second", 0.0)
    return (f"training {t['model']}: ok on {t['device']}, {TRAIN_STEPS} steps in {t['seconds']:.1f} s "
            f"({tps:.0f} positions/s)")


def speedups(rows: list[Row]) -> dict[str, float]:
    """Medusa's tokens/s over the baseline's, per model/backend/dtype."""
    by = {(r.model, r.backend, r.dtype, r.arm): r for r in rows if r.arm in ("baseline", "medusa")}
    return {f"{m}/{b}/{d}": round(r.tokens_per_s / by[(m, b, d, "baseline")].tokens_per_s, 3)
            for (m, b, d, arm), r in by.items() if arm == "medusa" and by[(m, b, d, "baseline")].tokens_per_s}


def report(plan: Plan, rows: list[Row], training: dict[str, Any], tests: dict[str, Any], meta: dict[str, Any]) -> int:
    header = (f"{'model':<14}{'backend':<8}{'dtype':<10}{'arm':<10}{'tokens':>7}{'time s':>9}{'tokens/s':>10}"
              f"{'τ':>7}  status")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(format_row(r))
    print(format_training(training))
    print(f"device tests (pytest -m cuda): {tests['status']}, {tests['summary']}")
    failed = [r.model for r in rows if r.status in ("MISMATCH", "ERROR")]
    failed += [name for name, c in (("training", training), ("device tests", tests)) if c["status"] != "ok"]
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    raw = {"plan": {k: str(v) for k, v in asdict(plan).items()}, **meta,
           "rows": [dict(asdict(r), tokens_per_s=r.tokens_per_s) for r in rows], "training": training,
           "device_tests": tests}
    (plan.out_dir / "gpu_check.json").write_text(json.dumps(raw, indent=1))
    print(json.dumps({"device": plan.device, "ok": not failed, "failed": len(failed), "speedup": speedups(rows),
                      "unavailable": sorted({r.reason.split(':')[0] for r in rows if r.status == "unavailable"}),
                      "raw": str(plan.out_dir / "gpu_check.json")}))
    return 1 if failed else 0


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if "jittor" in plan.backends or "hybrid" in plan.backends:
        try:
            from medusa_jittor.runtime import jt

            info["jittor_cuda"] = bool(jt.has_cuda and jt.flags.use_cuda)
        except ImportError as err:
            info["jittor_cuda"] = f"unavailable ({err})"
    return info


def main() -> int:
    plan = Plan.from_env()
    meta = environment(plan)
    print(f"gpu_check on {plan.device}: {json.dumps(meta)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        specs = model_specs(plan, tiny_model(work / "tiny-llama"))
        rows = check_models(plan, specs)
        (work / "train").mkdir()
        real = specs.get("smollm2")  # a CPU trains SmolLM2's heads too slowly for a check: the tiny model there
        on_gpu = plan.device.startswith("cuda") and real is not None and real.directory is not None
        training = check_training(real.directory if on_gpu else specs["tiny-random"].directory, plan, work / "train")
    tests = check_device_tests(with_smollm2=real is not None and real.directory is not None)
    return report(plan, rows, training, tests, meta)


if __name__ == "__main__":
    sys.exit(main())
