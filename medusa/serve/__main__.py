"""``python -m medusa.serve``: load a backend with the shared run flags and serve it over HTTP.

The decoding flags (``--temperature``, ``--max-new-tokens``, ...) are the defaults of requests
that do not set them.  The server binds to loopback unless told otherwise; ``--api-key`` (or
``$JEDUSA_API_KEY``) makes every endpoint but ``/health`` require ``Authorization: Bearer KEY``.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..core.options import RunOptions
from ..core.prompts import stop_token_ids
from .app import ServerConfig, create_app

log = logging.getLogger("medusa.serve")
API_KEY_ENV = "JEDUSA_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medusa.serve", description="OpenAI-compatible Medusa server")
    RunOptions.add_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: --model, a path cut to its last component)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the one generating; more get 429 (default: 16)")
    s.add_argument("--max-body-mb", type=float, default=1.0, help="largest request body; larger get 413 (default: 1)")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset: no check)")
    s.add_argument("--stats", action="store_true", help="log tokens/step and latency of every request")
    return p


def public_name(model: str) -> str:
    """The id clients see for ``--model``: a short name or hub id as given, a path cut to its last part."""
    return Path(model).name if os.path.isabs(model) or os.path.exists(model) else model


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_queue < 0:
        parser.error("--max-queue must be >= 0")
    if not args.max_body_mb > 0:
        parser.error("--max-body-mb must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    opts = RunOptions.from_args(args)
    try:
        backend = opts.load()
        defaults = opts.generation(stop_token_ids(backend.tokenizer, opts.conv_template))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(args.served_model_name or public_name(backend.describe()["model"]), defaults, opts.max_len,
                          opts.conv_template, args.stats, args.max_queue, int(args.max_body_mb * 2**20), api_key)
    log.info("serving %s as %r", json.dumps(backend.describe()), config.model_id)
    if api_key is None and not _is_loopback(args.host):
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)
    uvicorn.run(create_app(backend, config), host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
