"""The built-in testbed: a small LLaVA trained here from nothing on synthetic visual multiple-choice questions.

``ensure_testbed(size)`` returns the directory of a ``save_pretrained`` checkpoint (built on first
use, cached after) that loads through the same adapter as a LLaVA-1.5 checkpoint;
``testbed_info(size)`` says what its build measured; :mod:`lowrank_kit.data.synthetic` makes the
questions (also the ``testbed`` calibration source and evaluation set). See docs/testbed.md.
"""

from __future__ import annotations

from lowrank_kit.testbed.build import (
    TESTBED_VERSION,
    build_testbed,
    ensure_testbed,
    is_testbed_dir,
    testbed_dir,
    testbed_info,
)
from lowrank_kit.testbed.train import letter_accuracy

__all__ = [
    "TESTBED_VERSION",
    "build_testbed",
    "ensure_testbed",
    "is_testbed_dir",
    "letter_accuracy",
    "testbed_dir",
    "testbed_info",
]
