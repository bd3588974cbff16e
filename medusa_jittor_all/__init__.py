"""Medusa with everything in Jittor: the backbone (a mirror of ``medusa.llama``), its fixed-shape
KV cache, tree verification and the heads (from ``medusa_jittor``).  Backend name: ``jittor``."""
