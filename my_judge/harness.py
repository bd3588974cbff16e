"""One generation harness for every speed measurement: backends, baseline/Medusa, HF references.

An *arm* turns prompt ids into new ids under one decoding method; ``run_question`` drives a
multi-turn conversation through an arm (turn 2 sees turn 1's answer) and times each turn the same
way for every arm: the device is synchronised before and after, prefill included, and new tokens
counted from the returned ids.  Each turn's wall time splits at the moment the arm hands out its
first new tokens: ``prefill_s`` (time to first tokens) and ``decode_s`` (the rest), so that
``prefill_s + decode_s`` is the wall time that end-to-end tokens/s divide by.  Time to first tokens
is the prompt's forward pass and, in our engine (whose first ``Step`` comes with the next step's
tokens), one decoding step; HF's streamer hands out the first token after the prompt's pass alone.
The tools' run flags are ``RunOptions`` (``add_run_args`` adds them with the harness defaults,
``run_options`` parses them); nothing here takes a Namespace.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from medusa.core.config import GenerationConfig
from medusa.core.options import RunOptions
from medusa.core.prompts import encode_prompt, stop_token_ids
from medusa.core.stats import Record, source_counts


class Output(NamedTuple):
    """What an arm made of one prompt: the new ``ids``, decoding ``steps`` and accept histogram
    (tokens per step -> steps), when the first new tokens were out (``time.perf_counter()``) and how
    many they were, and the tokens per draft source (``engine.Step.sources``) where the arm has them."""

    ids: list[int]
    steps: int
    hist: dict[int, int]
    first_at: float
    first_tokens: int
    sources: Optional[dict[str, int]] = None


# prompt ids, config -> Output
Generate = Callable[[list[int], GenerationConfig], Output]


@dataclass
class TurnRecord(Record):
    """A ``Record`` with the turn's wall time split at its first new tokens: ``prefill_s`` (time to
    first tokens, over ``prompt_tokens``) + ``decode_s`` (the other ``new_tokens - first_tokens``)."""

    prompt_tokens: int = 0
    first_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class Arm:
    name: str
    generate: Generate
    synchronize: Callable[[], None]
    medusa: bool = False


# The harness tools' historical defaults (README): shorter answers than the chat CLI, seeded sampling.
HARNESS_DEFAULTS = {"max_new_tokens": 256, "seed": 0}


class PromptTooLong(ValueError):
    """A question whose prompt alone does not fit the KV budget (``--max-len``)."""


def add_run_args(p: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """``RunOptions``' flags with the harness defaults; ``defaults`` override them by field name."""
    return RunOptions.add_args(p, **{**HARNESS_DEFAULTS, **defaults})


def run_options(args: argparse.Namespace) -> RunOptions:
    """The run options of a tool that picks its arms with ``--mode``, where ``--baseline`` would be
    ignored: it is refused instead."""
    opts = RunOptions.from_args(args)
    if opts.baseline:
        raise ValueError("--baseline does not apply here: choose the arms with --mode baseline|medusa|both")
    return opts


def run_config(tokenizer: Any, opts: RunOptions) -> GenerationConfig:
    """The decoding config of ``opts`` with the tokenizer's (and template's) stop ids."""
    return opts.generation(stop_token_ids(tokenizer, opts.conv_template))


def check_prompts_fit(tokenizer: Any, questions: list[dict[str, Any]], opts: RunOptions,
                      turns: Optional[int] = None) -> None:
    """Refuse, before anything is timed, a question turn whose text alone cannot fit ``--max-len``.

    Each turn is measured as a one-message prompt: exact for turn 1, a lower bound for later turns
    (their prompts also hold the earlier turns and answers, which the engine checks when they exist)."""
    for q in questions:
        for turn, text in enumerate(q["turns"][:turns], 1):
            n = len(encode_prompt(tokenizer, [{"role": "user", "content": text}], opts.conv_template))
            if n + 1 > opts.max_len:  # the engine needs room for the prompt and one new token
                raise PromptTooLong(f"question {q['question_id']} turn {turn}: the prompt is {n} tokens, longer "
                                    f"than --max-len {opts.max_len}: shorten the question or raise --max-len")


def backend_arm(backend: Any, medusa: bool, draft: Optional[str] = None, name: Optional[str] = None) -> Arm:
    """Our engine, baseline or Medusa; ``draft`` (heads, ngram, both) overrides the config's draft sources."""
    changes: dict[str, Any] = {"medusa": medusa} if draft is None else {"medusa": medusa, "draft": draft}

    def generate(ids: list[int], cfg: GenerationConfig) -> Output:
        steps, first_at = [], 0.0
        for step in backend.generate(ids, cfg.with_(**changes)):
            if not steps:
                first_at = time.perf_counter()
            steps.append(step)
        has_sources = all(getattr(s, "sources", None) for s in steps)  # an engine without draft sources has none
        return Output([t for s in steps for t in s.tokens], len(steps), dict(Counter(len(s.tokens) for s in steps)),
                      first_at, len(steps[0].tokens), source_counts(steps) if has_sources else None)

    return Arm(name or ("medusa" if medusa else "baseline"), generate, backend.synchronize, medusa)


def hf_arm(model: Any, name: str, prompt_lookup: Optional[int] = None) -> Arm:
    """HF ``generate`` on the same weights, plain or with prompt-lookup decoding, as a reference."""
    import torch

    def generate(ids: list[int], cfg: GenerationConfig) -> Output:
        sample = cfg.temperature > 0
        chunks = _Chunks()
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens,
                                  "eos_token_id": list(cfg.stop_token_ids) or None, "streamer": chunks}
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        if prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=model.device), **kwargs)[0, len(ids):].tolist()
        return Output(out, len(chunks.sizes), dict(Counter(chunks.sizes)), chunks.first_at, chunks.sizes[0])

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    return Arm(name, generate, sync)


class _Chunks:
    """A ``transformers`` streamer that keeps when the first new tokens came and how many came per
    step (prompt lookup hands out several); ``generate`` puts the prompt first, then each step's tokens."""

    def __init__(self) -> None:
        self.prompt_seen, self.first_at, self.sizes = False, 0.0, []

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if not self.sizes:
            self.first_at = time.perf_counter()
        self.sizes.append(int(value.numel()))

    def end(self) -> None:
        """Nothing is held back (part of the streamer protocol)."""


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
        out = arm.generate(ids, cfg)
        arm.synchronize()
        end = time.perf_counter()
        answer = tokenizer.decode(out.ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        first_at = min(max(out.first_at, start), end)
        records.append(TurnRecord(question["question_id"], question.get("category", "general"), arm.name, turn,
                                  len(out.ids), out.steps, end - start, out.ids, out.hist, out.sources,
                                  prompt_tokens=len(ids), first_tokens=out.first_tokens,
                                  prefill_s=first_at - start, decode_s=end - first_at))
    return records, answers
