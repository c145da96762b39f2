"""Helpers shared by the test folders: compiling workloads, running the agent, reading its profiles."""
