"""An OpenAI-compatible HTTP server over any Jedusa backend: ``python -m medusa.serve``.

Our own tools (LLM judges, self-distillation, notebooks with the ``openai`` client) speak the
OpenAI API; serving Medusa behind it lets them use speculative decoding without a line changed.
Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, streamed
(server-sent events) or not, and ``GET /health``.

- ``schemas``: request models (unknown fields and invalid Unicode rejected), OpenAI-shaped errors
  ``{"error": {"message", "type", "param", "code"}}``, responses built from ``openai.types`` plus
  the ``"medusa": {"steps", "accepted_tokens", "mean_accepted_length"}`` extension.
- ``worker``: one thread owns the backend (one KV cache, not thread-safe) and runs admitted
  requests in order; a bounded queue (429 past ``--max-queue``); tokenising and detokenising off
  the event loop; a job stops within one decoding step once its request is over.
- ``app``: routes, the request guard (``--api-key``, ``--max-body-mb``), disconnect handling.
- ``__main__``: the command line (the shared run flags of ``core.options`` + server flags).
- ``loadtest``: concurrent clients against a loopback server; latency, throughput, errors by kind.

Text stays at the edge: the engine sees token ids and stops on EOS; chat templates,
detokenisation and ``stop`` strings are handled here (``core.text.TextStream``).  Defaults are the
server's: a request without ``temperature`` / ``top_p`` / ``max_tokens`` gets ``--temperature``
(0 = greedy, unlike OpenAI's 1) / ``--top-p`` / ``--max-new-tokens`` (capped by the context left).
"""
from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
