"""Pruning: model-family adapters' use, importance scores, plans, the target search, streaming rewrite."""
