/* Off-CPU profiler: how long threads stay blocked (scheduled out while asleep), and in which stacks.
 *
 * A block starts when a task switches out in a sleeping state (prev_state S or D) and ends when it
 * switches in again, so it includes the run-queue wait after the wake-up, as bcc's offcputime. Not
 * blocks: preemption and sched_yield (the task stays runnable: that is CPU contention, which the CPU
 * profiler sees), stopped and traced tasks, exiting tasks, and TASK_IDLE waits (kernel workers with
 * nothing to do). The idle task (pid 0) is skipped; kernel threads are kept, with no user stack.
 * Every followed block has an entry in `start` (tid -> {switch-out time, N}) until it ends.
 *
 * Attach points (USE_KPROBE selects which one is compiled, so only one program is ever loaded):
 *   USE_KPROBE=0: the sched:sched_switch tracepoint (on_sched_switch). bpf_get_stack walks only the
 *     current task, which at sched_switch is the one leaving: the stacks must be taken at switch-out.
 *     They wait in `stacks` (tid -> struct stack_event) until the thread switches in; if the block was
 *     long enough the record is completed in place and sent from the map value. Only qualifying blocks
 *     reach the perf buffer: sending every switch-out with its stacks and completing it later would push
 *     each sub-millisecond sleep through the perf buffer and the Python decoder, which costs far more
 *     than the 2 KiB copy into the map. `stacks` is an LRU map smaller than `start` (an entry is 2 KiB,
 *     preallocated): when more threads are blocked than it holds, the longest-idle ones lose their
 *     stacks rather than the busy ones, and a block whose stacks were evicted is counted as lost.
 *   USE_KPROBE=1: a kprobe on finish_task_switch (on_finish_task_switch; the symbol may carry an .isra.N
 *     suffix). It runs as the incoming task, whose stacks are still those it blocked in (it is returning
 *     from schedule()), so nothing but `start` is kept and the stacks are walked only for blocks that
 *     qualify. Preemption cannot be told from a sleep there: the task's state is read instead (__state
 *     from 5.14, state before).
 *   Both: tracepoints sched:sched_process_exec and sched:sched_process_exit (forget announced pids).
 * Bounding the event rate (user space writes `params`, see PARAM_* in common.h):
 *   PARAM_SAMPLING = N (>= 1): each block is followed with probability 1/N, decided with
 *     bpf_get_prandom_u32() at switch-out so a skipped block costs no stack walk and no map entry; each
 *     record carries the N it was kept under and user space weights it by N: totals stay unbiased.
 *   PARAM_MIN_BLOCK_NS: shorter blocks are dropped at switch-in.
 * Lost data, in lost_counts (read by user space): LOST_START_FULL, a block not followed because `start`
 *   was full (or busy); LOST_STACKS_EVICTED, a qualifying block whose stacks were evicted from `stacks`.
 *   Perf-buffer losses are counted by user space's lost_cb.
 * Output: perf buffer `samples` (struct stack_event: value = blocked ns, timestamp_ns and cpu = when and
 *   where the block ended, sampling = N) and perf buffer `proc_events` (struct proc_event), as cpu.bpf.c.
 * Minimum kernel: 4.18 (bpf_get_stack from tracepoint and kprobe programs; prev_state as reported
 *   since 4.14: S = 1, D = 2, preempted = TASK_REPORT_MAX).
 *
 * Compile-time parameters (cflags): KNOWN_PIDS_ENTRIES, FILTER_PIDS (0/1), AGENT_PID (never followed),
 *   USER_STACK_BYTES (user stack copied for DWARF unwinding; 0: none), USE_KPROBE (0/1),
 *   BLOCKED_ENTRIES (blocked threads followed at once: `start`), STACK_ENTRIES (`stacks`).
 */
#include <linux/sched.h>
#include <linux/version.h>
#include "common.h"

#define LOST_START_FULL 0     /* a block could not be followed: `start` full or busy */
#define LOST_STACKS_EVICTED 1 /* a qualifying block's stacks were evicted from `stacks` */
#define LOST_COUNT 2

struct block_start {
    u64 start_ns;
    u64 sampling; /* N */
};

/* Sleeping states, in sched_switch's prev_state (one bit per reported state: TASK_IDLE is reported as
 * its own bit, 0x80) and in the task's __state (where TASK_IDLE also sets TASK_NOLOAD). */
#define SLEEPING_STATES (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE)

BPF_PERCPU_ARRAY(scratch, struct stack_event, 1); /* records are too big for the 512-byte BPF stack */
BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_ENTRIES); /* processes already announced */
#if FILTER_PIDS
BPF_HASH(pid_filter, u32, u8, 4096);
#endif
BPF_ARRAY(params, u64, PARAM_COUNT);
BPF_ARRAY(lost_counts, u64, LOST_COUNT);
BPF_HASH(start, u32, struct block_start, BLOCKED_ENTRIES); /* by tid: the blocks being followed */
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

static __always_inline u64 param(u32 index)
{
    u64 *value = params.lookup(&index);
    return value ? *value : 0;
}

/* Follow a block of `tid` that starts now, with probability 1/N; true when it is followed. */
static __always_inline bool block_starts(u32 pid, u32 tid, u64 now)
{
    if (pid == AGENT_PID)
        return false;
#if FILTER_PIDS
    if (!pid_filter.lookup(&pid))
        return false;
#endif
    struct block_start block = {.start_ns = now, .sampling = param(PARAM_SAMPLING)};
    if (block.sampling <= 1)
        block.sampling = 1;
    else if (bpf_get_prandom_u32() % block.sampling != 0)
        return false;
    if (start.update(&tid, &block) != 0) {
        lost_counts.atomic_increment(LOST_START_FULL);
        return false;
    }
    return true;
}

/* The block of `tid` ends now: false when it was not followed. Else its start time, and its N when it
 * lasted at least the minimum (0 when it is too short to report). */
static __always_inline bool block_ends(u32 tid, u64 now, u64 *start_ns, u64 *sampling)
{
    struct block_start *block = start.lookup(&tid);
    if (!block)
        return false;
    *start_ns = block->start_ns;
    *sampling = now - block->start_ns >= param(PARAM_MIN_BLOCK_NS) ? block->sampling : 0;
    start.delete(&tid);
    return true;
}

/* Who the current task is and both its stacks; returns the record's size. */
static __always_inline u32 fill_current(void *ctx, struct stack_event *e, u64 id, u64 now)
{
    e->timestamp_ns = now;
    e->value = 0;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->cpu = bpf_get_smp_processor_id();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    e->flags = (task->flags & PF_KTHREAD) ? SAMPLE_FLAG_KERNEL_THREAD : 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return collect_stacks(ctx, e);
}

static __always_inline void submit(void *ctx, struct stack_event *e, u32 size, u64 now)
{
    samples.perf_submit(ctx, e, size);
    if (!(e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        announce_process(ctx, e->pid, now);
}

#if !USE_KPROBE
BPF_TABLE("lru_hash", u32, struct stack_event, stacks, STACK_ENTRIES); /* by tid: where it blocked */

int on_sched_switch(struct tracepoint__sched__sched_switch *args)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    int zero = 0;
    if (tid != 0 && (args->prev_state & SLEEPING_STATES) && block_starts(id >> 32, tid, now)) {
        struct stack_event *e = scratch.lookup(&zero);
        if (e) {
            fill_current(args, e, id, now);
            stacks.update(&tid, e); /* evicts the least recently used entry when full */
        }
    }
    u32 next = args->next_pid;
    u64 start_ns = 0, sampling = 0;
    if (next == 0 || !block_ends(next, now, &start_ns, &sampling))
        return 0;
    struct stack_event *e = stacks.lookup(&next);
    if (!e || e->timestamp_ns != start_ns) { /* evicted (an older entry is from an earlier block) */
        if (sampling)
            lost_counts.atomic_increment(LOST_STACKS_EVICTED);
    } else if (sampling) {
        e->value = now - start_ns;
        e->sampling = sampling;
        e->timestamp_ns = now;
        e->cpu = bpf_get_smp_processor_id();
        submit(args, e, record_size(e), now);
    }
    if (e)
        stacks.delete(&next);
    return 0;
}

#else
int on_finish_task_switch(struct pt_regs *ctx, struct task_struct *prev)
{
    u64 now = bpf_ktime_get_ns();
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 14, 0)
    long state = prev->__state;
#else
    long state = prev->state;
#endif
    u32 prev_tid = prev->pid;
    u32 prev_pid = prev->tgid;
    if (prev_tid != 0 && (state & SLEEPING_STATES) && !(state & TASK_NOLOAD))
        block_starts(prev_pid, prev_tid, now);
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 start_ns = 0, sampling = 0;
    if (tid == 0 || !block_ends(tid, now, &start_ns, &sampling) || !sampling)
        return 0;
    int zero = 0;
    struct stack_event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    u32 size = fill_current(ctx, e, id, now);
    e->value = now - start_ns;
    e->sampling = sampling;
    submit(ctx, e, size, now);
    return 0;
}
#endif

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
