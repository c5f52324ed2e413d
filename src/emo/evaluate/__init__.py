"""Evaluation shared by every kind of run: metrics, tables, figures, and re-evaluating a run."""
