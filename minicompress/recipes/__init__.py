"""Recipes: one module per command, the only code that loads models, places them on ranks
and writes folders.

Each recipe is one function whose signature is its CLI (as in litgpt): ``info``,
``eval``, ``score``, ``prune``, ``recover``, ``correct``, ``teacher_cache``, ``run``. It decides when and
where things happen (which model to load, on which rank, which folder to write and when
to resume), and hands tensors to the components below it, which never touch disk or
ranks: :mod:`minicompress.pruning.scoring`, :mod:`minicompress.pruning.plan`, :mod:`minicompress.pruning.search`,
:mod:`minicompress.distillation.loop`, :mod:`minicompress.distillation.losses`, :mod:`minicompress.evaluation.perplexity`,
:mod:`minicompress.arch` and :mod:`minicompress.runtime`. :mod:`minicompress.cli` keeps the
registry of subcommands and their flags.
"""
