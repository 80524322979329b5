"""Evaluation metrics. Evaluators receive predictions, never the model."""
