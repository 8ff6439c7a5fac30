"""Evaluation: corpus discovery and text windows, perplexity, zero-shot tasks."""
