"""Sampling stage: the adaptive sampler that keeps event rates and the agent's own CPU within budget."""
