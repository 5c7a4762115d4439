"""The ``lowrank`` command line (:mod:`lowrank_kit.cli.main`)."""
