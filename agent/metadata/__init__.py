"""Metadata stage: labels and resource attributes for the profiles (process, container, pod, unit, host).

Read-only side input of the report stage: `cgroup` parses /proc/PID/cgroup, `process` reads and caches
one process's labels, `filters` decides which processes are profiled, `host` owns the host attributes.
"""
