"""Evaluation: perplexity and KL, lm-eval tasks, speculative-decoding drafts."""
