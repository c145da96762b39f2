"""Unwind stage: user stacks from the stack copies records carry, with the binaries' CFI (`unwinder`,
`spaces`, `cfi`). CPU and off-CPU copies are unwound on the perf-reader thread, inside the
perf-buffer callback; allocation copies on the pipeline thread, after the keep decision; with
`unwind.<profiler> = fp` there is no copy and the kernel's frame-pointer stack is kept.
"""
