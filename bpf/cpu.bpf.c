/* CPU profiler: samples every online CPU at a fixed frequency and sends one record per sample.
 *
 * Attach points: a perf_event per CPU (PERF_COUNT_HW_CPU_CYCLES where the PMU exists, else the
 *   software cpu-clock) running on_cpu_sample; tracepoints sched:sched_process_exec and
 *   sched:sched_process_exit.
 * Output: perf buffer `samples` (struct stack_event with both stacks inline) and perf buffer
 *   `proc_events` (struct proc_event: a process's first sample, so user space captures its mappings
 *   while it is alive, and exec).
 * Minimum kernel: 4.18 (bpf_get_stack from perf_event programs).
 *
 * Compile-time parameters (cflags): KNOWN_PIDS_ENTRIES, FILTER_PIDS (0/1),
 *   AGENT_PID (never sampled), USER_STACK_BYTES (user stack copied for DWARF unwinding; 0: none).
 */
#include <uapi/linux/bpf_perf_event.h>
#include <linux/sched.h>
#include "common.h"

BPF_PERCPU_ARRAY(scratch, struct stack_event, 1); /* records are too big for the 512-byte BPF stack */
BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_ENTRIES); /* processes already announced */
BPF_HASH(pid_filter, u32, u8, 4096);                            /* used only when FILTER_PIDS */
BPF_PERF_OUTPUT(samples);
BPF_PERF_OUTPUT(proc_events);

static __always_inline void announce_process(void *ctx, u32 pid, u64 now)
{
    u8 one = 1;
    if (known_pids.lookup(&pid))
        return;
    known_pids.update(&pid, &one);
    struct proc_event event = {.timestamp_ns = now, .pid = pid, .kind = PROC_EVENT_NEW};
    proc_events.perf_submit(ctx, &event, sizeof(event));
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    u32 tid = (u32)id;
    if (tid == 0 || pid == AGENT_PID) /* the idle task (nothing ran), or the agent itself */
        return 0;
#if FILTER_PIDS
    if (!pid_filter.lookup(&pid))
        return 0;
#endif
    int zero = 0;
    struct stack_event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    e->timestamp_ns = bpf_ktime_get_ns();
    e->value = 0;
    e->sampling = 0;
    e->pid = pid;
    e->tid = tid;
    e->cpu = bpf_get_smp_processor_id();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    e->flags = (task->flags & PF_KTHREAD) ? SAMPLE_FLAG_KERNEL_THREAD : 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    u32 size = collect_stacks(ctx, e);
    samples.perf_submit(ctx, e, size);
    if (!(e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        announce_process(ctx, pid, e->timestamp_ns);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    known_pids.delete(&pid);
    struct proc_event event = {.timestamp_ns = bpf_ktime_get_ns(), .pid = pid, .kind = PROC_EVENT_EXEC};
    proc_events.perf_submit(args, &event, sizeof(event));
    return 0;
}

/* A pid whose process has exited may be reused by a forked child that never execs: forget it so the
 * new process is announced and its own mappings captured. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    if ((u32)id == pid)
        known_pids.delete(&pid);
    return 0;
}
