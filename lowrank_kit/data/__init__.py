"""Calibration and evaluation data: multiple-choice VQA items, prompts and calibration samples."""
