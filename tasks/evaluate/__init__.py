"""Evaluation: suites, metrics, an async runner over OpenAI-compatible targets, comparison, MLflow logs."""
