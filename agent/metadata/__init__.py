"""Metadata stage: labels and resource attributes for the profiles (process, container, pod, unit, host).

Upstream of every stage but the base: `cgroup` parses /proc/PID/cgroup, `process` reads and caches one
process's labels (the process registry captures them with each snapshot), `filters` and `selector`
decide which processes are profiled (the pipeline asks), `host` owns the host attributes (the OTLP
resource carries them).
"""
