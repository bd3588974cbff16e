"""Medusa-1 head training: data (ShareGPT, self-distillation), hidden-state cache, trainer, trees."""
