"""Rank-choosing agents of rlrank (installed as ``rlrank.agents``)."""
