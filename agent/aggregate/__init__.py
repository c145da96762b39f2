"""Aggregate stage: each profiler's events summed per reporting interval (`interval`), and the records it
hands on (`types`).
"""
