/* CPU profiler: samples every online CPU at a fixed frequency and sends one record per sample.
 *
 * Attach points: a perf_event per CPU (PERF_COUNT_HW_CPU_CYCLES where the PMU exists, else the
 *   software cpu-clock) running on_cpu_sample; tracepoint sched:sched_process_exec.
 * Output: perf buffer `samples` (struct cpu_sample) and perf buffer `proc_events` (struct proc_event).
 * Stacks go into one of two stack-trace maps chosen by control[0]: user space flips the generation at
 *   each interval end and clears the idle map only after every record that refers to it has been read,
 *   so a stack id is never read after its bucket was reused.
 * Minimum kernel: 4.9 (BPF on perf events); 4.18 for BPF_MAP_TYPE_LRU_HASH semantics used here.
 *
 * Compile-time parameters (cflags): STACK_MAP_ENTRIES, KNOWN_PIDS_ENTRIES, FILTER_PIDS (0/1).
 */
#include <uapi/linux/bpf_perf_event.h>
#include <linux/sched.h>
#include "common.h"

BPF_STACK_TRACE(stacks_0, STACK_MAP_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_MAP_ENTRIES);
BPF_ARRAY(control, u32, 1);                            /* [0]: active stack generation (0 or 1) */
BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_ENTRIES); /* processes already announced */
BPF_HASH(pid_filter, u32, u8, 4096);                   /* used only when FILTER_PIDS */
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
    if (tid == 0) /* the idle task: nothing ran */
        return 0;
#if FILTER_PIDS
    if (!pid_filter.lookup(&pid))
        return 0;
#endif
    struct cpu_sample sample = {};
    sample.timestamp_ns = bpf_ktime_get_ns();
    sample.pid = pid;
    sample.tid = tid;
    sample.cpu = bpf_get_smp_processor_id();
    u32 zero = 0;
    u32 *gen = control.lookup(&zero);
    sample.stack_gen = gen ? (*gen & 1) : 0;
    if (sample.stack_gen == 0) {
        sample.kernel_stack_id = stacks_0.get_stackid(&ctx->regs, 0);
        sample.user_stack_id = stacks_0.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    } else {
        sample.kernel_stack_id = stacks_1.get_stackid(&ctx->regs, 0);
        sample.user_stack_id = stacks_1.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    }
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    if (task->flags & PF_KTHREAD)
        sample.flags |= SAMPLE_FLAG_KERNEL_THREAD;
    bpf_get_current_comm(&sample.comm, sizeof(sample.comm));
    samples.perf_submit(ctx, &sample, sizeof(sample));
    if (!(sample.flags & SAMPLE_FLAG_KERNEL_THREAD))
        announce_process(ctx, pid, sample.timestamp_ns);
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
