"""Evaluation: multiple-choice VQA accuracy the way VLMEvalKit scores it, plus NLL and KL of the answer letter."""
