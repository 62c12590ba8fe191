"""Rank-choosing agents (installed as ``rlrank.agents``): DDPG, random search and rank rules,
registered by name for ``--agent`` (:mod:`rlrank.agents.registry`)."""
