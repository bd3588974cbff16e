"""Evaluation: speed benchmark, answer generation, LLM judge, results and plots."""
