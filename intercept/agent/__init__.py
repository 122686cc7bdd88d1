"""The agent that runs beside the app container: ``intercept agent``."""

from intercept.agent.agent import Agent, AgentConfig, run

__all__ = ["Agent", "AgentConfig", "run"]
