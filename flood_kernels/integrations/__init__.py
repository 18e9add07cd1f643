"""Integrations with training frameworks. Each submodule imports its framework lazily (optional extras)."""
