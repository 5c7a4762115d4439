"""The ``lowrank`` command line (:mod:`lowrank_kit.cli.main`).

The command modules share options and consoles defined in ``main``, and ``main`` registers their
commands at its end, so ``main`` is imported first whichever of them is imported.
"""

from lowrank_kit.cli import main as _main  # noqa: F401
