"""One generation harness for every speed measurement: backends, baseline/Medusa, HF references.

An *arm* turns prompt ids into new ids under one decoding method; ``run_question`` drives a
multi-turn conversation through an arm (turn 2 sees turn 1's answer) and times each turn the same
way for every arm: the device is synchronised before and after, prefill included, and new tokens
counted from the returned ids.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from medusa.core.backends import BACKENDS, Backend, load_backend
from medusa.core.config import GenerationConfig
from medusa.core.models import DEFAULT_MODEL
from medusa.core.prompts import encode_prompt, stop_token_ids
from medusa.core.stats import Record

# prompt ids, config -> (new ids, steps, accept histogram)
Generate = Callable[[list[int], GenerationConfig], tuple[list[int], int, dict[int, int]]]


@dataclass
class Arm:
    name: str
    generate: Generate
    synchronize: Callable[[], None]
    medusa: bool = False


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags that load a backend and set decoding, shared by every generating CLI."""
    p.add_argument("--backend", choices=list(BACKENDS), default="torch")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--medusa-heads", default=None,
                   help="Medusa checkpoint dir (default: the heads shipped for the model; 'fresh' = untrained)")
    p.add_argument("--tree", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--conv-template", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="time the parts of each Medusa step (heads, tree forward, posterior, cache update)")


def backend_from_args(args: argparse.Namespace) -> Backend:
    return load_backend(args.backend, model=args.model, heads=args.medusa_heads, tree=args.tree,
                        dtype=args.dtype, device=args.device, profile=args.profile)


def config_from_args(tokenizer: Any, args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                            stop_token_ids=stop_token_ids(tokenizer, args.conv_template))


def backend_arm(backend: Any, medusa: bool) -> Arm:
    def generate(ids: list[int], cfg: GenerationConfig) -> tuple[list[int], int, dict[int, int]]:
        steps = list(backend.generate(ids, cfg.with_(medusa=medusa)))
        return [t for s in steps for t in s.tokens], len(steps), dict(Counter(len(s.tokens) for s in steps))

    return Arm("medusa" if medusa else "baseline", generate, backend.synchronize, medusa)


def hf_arm(model: Any, name: str, prompt_lookup: Optional[int] = None) -> Arm:
    """HF ``generate`` on the same weights, plain or with prompt-lookup decoding, as a reference."""
    import torch

    def generate(ids: list[int], cfg: GenerationConfig) -> tuple[list[int], int, dict[int, int]]:
        sample = cfg.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens,
                                  "eos_token_id": list(cfg.stop_token_ids) or None}
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        if prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=model.device), **kwargs)[0, len(ids):].tolist()
        return out, len(out), {1: len(out)}

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    return Arm(name, generate, sync)


def warm_up(arm: Arm, tokenizer: Any, question: dict[str, Any], cfg: GenerationConfig,
            template: Optional[str] = None) -> None:
    """One short untimed generation, so the first timed question does not pay for lazy initialisation."""
    run_question(arm, tokenizer, question, cfg.with_(max_new_tokens=8), template, 1)


def run_question(arm: Arm, tokenizer: Any, question: dict[str, Any], cfg: GenerationConfig,
                 template: Optional[str] = None, turns: Optional[int] = None) -> tuple[list[Record], list[str]]:
    """All (or the first ``turns``) turns of a question: (records, answer texts)."""
    messages: list[dict[str, str]] = []
    records, answers = [], []
    for turn, text in enumerate(question["turns"][:turns], 1):
        messages.append({"role": "user", "content": text})
        ids = encode_prompt(tokenizer, messages, template)
        arm.synchronize()
        start = time.perf_counter()
        out, steps, hist = arm.generate(ids, cfg)
        arm.synchronize()
        elapsed = time.perf_counter() - start
        answer = tokenizer.decode(out, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        records.append(Record(question["question_id"], question.get("category", "general"), arm.name, turn,
                              len(out), steps, elapsed, out, hist))
    return records, answers
