"""nat_ray: negative-aware training (NAT) of tool-using LLM agents, at cluster scale on Ray.

The pure core (ReAct parsing and stepping, tools, scoring, NAT data) imports neither Ray nor vLLM;
the stages (rollout, train, serve) are thin Ray glue on top of it.
"""

__version__ = "0.1.0"
