"""The findings harness: the seed papers' claims measured on our tasks (docs/findings.md).

An experiment beside the library, not in it: ``suite`` declares the claims and runs them through
deltatune's public API (``deltatune.training.train``, ``deltatune.analysis.analyze``), one JSON run
file per finished run; ``page`` writes the page from those files; ``run.py`` is the script.
"""
