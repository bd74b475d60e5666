"""The pure core: what an agent says and does, how it is scored, and what it is trained on.

ReAct prompts and parsing, the agent's stepper, scoring rules, NAT's data recipes, trajectory records,
loss masks and agent cards. Nothing here imports Ray, vLLM, torch, DeepSpeed or an HTTP client (the
layout test checks), so all of it is tested in milliseconds and used alike by every stage.
"""
