"""Probes stage: the one BPF object (`program`), each profiler's attach points and perf buffer (`cpu`,
`offcpu`, `alloc` on `bpf_probe`), the perf reader (`reader`), and the decoding of records and their
inline stacks (`events`, `stacks`, `records`). CPU and off-CPU records with a user stack copy are
unwound by their decoder, inside the perf-buffer callback; allocation records keep their copy for the
pipeline thread.
"""
