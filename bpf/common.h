/* Structs that cross the kernel/user boundary, shared by every program in bpf/, and the helpers that
 * fill them. Their ctypes mirrors live in agent/probes/records.py; tests/unit/test_records_layout.py
 * checks that sizeof and every field offset agree. Keep fields naturally aligned, padding explicit.
 *
 * Stacks travel inside each record (bpf_get_stack, kernel >= 4.18) rather than as ids into a
 * BPF_STACK_TRACE map: a stack map answers -EEXIST for every later stack that hashes to an occupied
 * bucket, so one early collision can cost a hot stack all its samples for the rest of an interval,
 * and an id read after its bucket was reused names the wrong stack. Only the filled part of `ips` is
 * sent, so a typical record is a few hundred bytes. */
#ifndef PROFILING_AGENT_COMMON_H
#define PROFILING_AGENT_COMMON_H

#define AGENT_COMM_LEN 16
#define MAX_STACK_DEPTH 127 /* the kernel's PERF_MAX_STACK_DEPTH */

/* stack_event.flags */
#define SAMPLE_FLAG_KERNEL_THREAD 1 /* the task has no user address space: no user stack to walk */

/* proc_event.kind */
#define PROC_EVENT_NEW 1  /* first sample of a process (or first after exec): capture its mappings now */
#define PROC_EVENT_EXEC 2 /* the process replaced its image: mappings captured earlier are stale */

/* Indices into each program's `params` array (u64), written by user space: the adaptive sampler
 * changes them at run time, and every record carries the sampling value it was kept under. */
#define PARAM_SAMPLING 0     /* off-CPU: keep 1 in N events; allocations: mean bytes between samples */
#define PARAM_MIN_BLOCK_NS 1 /* off-CPU: shorter blocks are not reported */
#define PARAM_COUNT 4

struct stack_event {
    u64 timestamp_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u64 value;              /* profiler-specific measure: 0 (CPU), blocked ns (off-CPU), bytes (alloc) */
    u64 sampling;           /* params[PARAM_SAMPLING] when the event was kept (0 for CPU samples) */
    u32 pid;                /* tgid */
    u32 tid;
    u32 cpu;
    u32 flags;              /* SAMPLE_FLAG_* */
    s32 kernel_stack_len;   /* frames in ips[0..], or -errno from bpf_get_stack */
    s32 user_stack_len;     /* frames following the kernel frames, or -errno */
    char comm[AGENT_COMM_LEN];
    u64 ips[2 * MAX_STACK_DEPTH]; /* kernel frames, then user frames, leaf first */
};

struct proc_event {
    u64 timestamp_ns;
    u32 pid;
    u32 kind;               /* PROC_EVENT_* */
};

/* Walk both stacks of the current task into e->ips; returns the number of bytes of `e` to submit.
 * The masks keep every offset provably inside `ips` for the verifier. */
static __always_inline u32 collect_stacks(void *ctx, struct stack_event *e)
{
    long kernel = bpf_get_stack(ctx, e->ips, MAX_STACK_DEPTH * sizeof(u64), 0);
    u32 nk = kernel > 0 ? ((u32)kernel / sizeof(u64)) & 0x7f : 0;
    e->kernel_stack_len = kernel < 0 ? (s32)kernel : (s32)nk;
    u32 nu = 0;
    if (e->flags & SAMPLE_FLAG_KERNEL_THREAD) {
        e->user_stack_len = -14; /* -EFAULT: there is no user stack */
    } else {
        long user = bpf_get_stack(ctx, &e->ips[nk], MAX_STACK_DEPTH * sizeof(u64), BPF_F_USER_STACK);
        nu = user > 0 ? ((u32)user / sizeof(u64)) & 0x7f : 0;
        e->user_stack_len = user < 0 ? (s32)user : (s32)nu;
    }
    return offsetof(struct stack_event, ips) + (nk + nu) * sizeof(u64);
}

#endif
