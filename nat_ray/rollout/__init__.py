"""The rollout stage: Ray Data runs the agent over a task's questions and writes scored trajectories.

:mod:`~nat_ray.rollout.run` is the stage (``nat-ray rollout``); :mod:`~nat_ray.rollout.engine_pool`
keeps engines up between a loop's rounds so a round only loads its new adapter.
"""
