/* Structs that cross the kernel/user boundary, shared by every program in bpf/.
 * Their ctypes mirrors live in agent/probes/records.py; tests/unit/test_records_layout.py checks that
 * sizeof and every field offset agree. Keep fields naturally aligned and the padding explicit. */
#ifndef PROFILING_AGENT_COMMON_H
#define PROFILING_AGENT_COMMON_H

#define AGENT_COMM_LEN 16

/* sample_flags */
#define SAMPLE_FLAG_KERNEL_THREAD 1 /* the task has no user address space: no user stack to walk */

/* proc_event.kind */
#define PROC_EVENT_NEW 1  /* first sample of a process (or first after exec): capture its mappings now */
#define PROC_EVENT_EXEC 2 /* the process replaced its image: mappings captured earlier are stale */

struct cpu_sample {
    u64 timestamp_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u32 pid;                /* tgid */
    u32 tid;
    u32 cpu;
    s32 user_stack_id;      /* >= 0: id in stacks_<stack_gen>; < 0: -errno from get_stackid */
    s32 kernel_stack_id;
    u32 stack_gen;          /* which of the two stack maps the ids refer to */
    u32 flags;              /* SAMPLE_FLAG_* */
    u32 _pad;
    char comm[AGENT_COMM_LEN];
};

struct proc_event {
    u64 timestamp_ns;
    u32 pid;
    u32 kind;               /* PROC_EVENT_* */
};

#endif
