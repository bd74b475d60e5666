"""Experiments that chain the stages: the pipeline (rollout, train per variant, evaluate) and the loop
(rounds of collect, train, evaluate, publish), with their manifests (resume) and trackers (MLflow,
TensorBoard).
"""
