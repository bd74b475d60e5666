"""Evaluation: a model asked every test question, and the tables that compare models.

:mod:`~nat_ray.evaluation.run` is the stage (``nat-ray eval``); :mod:`~nat_ray.evaluation.results_table`
turns summaries into accuracy tables with n and intervals (pure).
"""
