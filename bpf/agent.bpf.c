/* The agent's one BPF program object: every enabled profiler's programs and the process events they
 * share, compiled once by BCC (agent/probes/program.py) with the enabled profilers chosen by cflags.
 *
 * Why one object: each process is announced once (one `known_pids`, one `proc_events` buffer), however
 * many profilers sample it, so its mappings are captured once; one exec/exit tracepoint pair serves all;
 * one reader polls every buffer. Why one file: BCC rewrites map calls (`m.lookup(...)`) only in the file
 * it compiles, not in files that file #includes, so every program that touches a map lives here, each
 * profiler in its own `#if PROFILE_<NAME>` section. Each profiler's maps carry its name; a profiler's
 * scratch record is its own (a perf_event program can interrupt another program on the same CPU).
 *
 * Shared (always compiled): `known_pids` (processes already announced), `pid_filter` (FILTER_PIDS: the
 *   CPU and off-CPU profilers sample only those pids), perf buffer `proc_events` (struct proc_event: a
 *   process's first sample, so user space captures its mappings while it is alive, exec, and a Python
 *   walk's new code object, so user space reads it while the process is alive), and the
 *   tracepoints sched:sched_process_exec and sched:sched_process_exit.
 * Profilers (each section's comment gives its attach points and minimum kernel):
 *   PROFILE_CPU: a perf_event per CPU (on_cpu_sample) -> perf buffer `cpu_samples`.
 *   PROFILE_OFFCPU: the sched:sched_switch tracepoint (on_sched_switch) or, with USE_KPROBE=1, a kprobe
 *     on finish_task_switch (on_finish_task_switch) -> perf buffer `offcpu_samples`.
 *   PROFILE_ALLOC: uprobes on the C library's allocators (on_malloc, ...) -> perf buffer `alloc_samples`.
 * Minimum kernel: 4.18 (bpf_get_stack) for CPU and off-CPU, 5.5 (bpf_probe_read_user) with allocations;
 *   5.15 with BTF for a CPU or off-CPU user stack copy (bpf_task_pt_regs).
 *
 * Compile-time parameters (cflags): PROFILE_CPU, PROFILE_OFFCPU, PROFILE_ALLOC (0/1), KNOWN_PIDS_ENTRIES,
 *   FILTER_PIDS (0/1), AGENT_PID (never sampled); CPU_STACK_BYTES, OFFCPU_STACK_BYTES, ALLOC_STACK_BYTES
 *   (user stack copied per record for DWARF unwinding; 0: none); off-CPU: USE_KPROBE (0/1),
 *   BLOCKED_ENTRIES, STACK_ENTRIES; allocations: THREAD_ENTRIES; Python frames: PYTHON_FRAMES (the walk's
 *   limit, python.max_frames; 0 compiles the walker out), TASK_FSBASE_OFFSET, PYTHON_PROCS_ENTRIES,
 *   PYTHON_THREADS_ENTRIES, PYTHON_CODES_SEEN_ENTRIES; announcements: IMAGE_LAYOUT (0/1) and the BTF
 *   offsets it reads at (agent.features.IMAGE_MEMBERS: TASK_MM_OFFSET, ..., SB_DEV_OFFSET).
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>
#include <linux/sched.h>
#include <linux/version.h>
#include "common.h"

#ifndef PROFILE_CPU
#define PROFILE_CPU 0
#endif
#ifndef PROFILE_OFFCPU
#define PROFILE_OFFCPU 0
#endif
#ifndef PROFILE_ALLOC
#define PROFILE_ALLOC 0
#endif

/* ---- the process events every profiler shares ---- */

BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_ENTRIES); /* processes already announced */
BPF_HASH(pid_filter, u32, u8, 4096);                            /* used only when FILTER_PIDS */
BPF_PERF_OUTPUT(proc_events);

#ifndef IMAGE_LAYOUT
#define IMAGE_LAYOUT 0
#endif
#if IMAGE_LAYOUT && !defined(SB_DEV_OFFSET)
#error "IMAGE_LAYOUT needs the BTF offsets of agent.features.IMAGE_MEMBERS"
#endif

/* Where the current process's image lies and which executable it runs (struct proc_event), read at
 * the offsets user space took from the kernel's BTF (the headers BCC compiles against may not be this
 * kernel's). A read that fails leaves its fields 0. */
static __always_inline void fill_image(struct proc_event *e)
{
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
#if IMAGE_LAYOUT
    u8 *task = (u8 *)bpf_get_current_task();
    u8 *mm = 0, *exe = 0, *inode = 0, *sb = 0;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), task + TASK_MM_OFFSET) != 0 || !mm)
        return;
    bpf_probe_read_kernel(&e->start_code, sizeof(e->start_code), mm + MM_START_CODE_OFFSET);
    bpf_probe_read_kernel(&e->mmap_base, sizeof(e->mmap_base), mm + MM_MMAP_BASE_OFFSET);
    bpf_probe_read_kernel(&e->vdso, sizeof(e->vdso), mm + MM_VDSO_OFFSET);
    if (bpf_probe_read_kernel(&exe, sizeof(exe), mm + MM_EXE_FILE_OFFSET) != 0 || !exe)
        return;
    if (bpf_probe_read_kernel(&inode, sizeof(inode), exe + FILE_INODE_OFFSET) != 0 || !inode)
        return;
    bpf_probe_read_kernel(&e->exe_ino, sizeof(e->exe_ino), inode + INODE_INO_OFFSET);
    if (bpf_probe_read_kernel(&sb, sizeof(sb), inode + INODE_SB_OFFSET) != 0 || !sb)
        return;
    bpf_probe_read_kernel(&e->exe_dev, sizeof(e->exe_dev), sb + SB_DEV_OFFSET);
#endif
}

/* The first record of a process (from any profiler) announces it, once until it execs or exits. A
 * record of an exiting task (SAMPLE_FLAG_EXITING: the rest of do_exit, after sched_process_exit has
 * forgotten the pid) announces nothing: the process is going, and it would be announced twice. */
static __always_inline void announce_process(void *ctx, u32 pid, u64 now, u32 flags)
{
    u8 one = 1;
    if (flags & (SAMPLE_FLAG_KERNEL_THREAD | SAMPLE_FLAG_EXITING))
        return;
    if (known_pids.lookup(&pid))
        return;
    known_pids.update(&pid, &one);
    struct proc_event event = {.timestamp_ns = now, .pid = pid, .kind = PROC_EVENT_NEW};
    /* Only from the process itself: an off-CPU record is sent by whichever task switches next. */
    if ((bpf_get_current_pid_tgid() >> 32) == pid)
        fill_image(&event);
    proc_events.perf_submit(ctx, &event, sizeof(event));
}

static __always_inline bool pid_wanted(u32 pid)
{
#if FILTER_PIDS
    return pid_filter.lookup(&pid) != 0;
#else
    return true;
#endif
}

/* Who the current task is: the fields every profiler's record starts with. */
static __always_inline void fill_task(struct stack_event *e, u64 id, u64 now)
{
    e->timestamp_ns = now;
    e->value = 0;
    e->sampling = 0;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->cpu = bpf_get_smp_processor_id();
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    unsigned int task_flags = task->flags;
    e->flags = (task_flags & PF_KTHREAD) ? SAMPLE_FLAG_KERNEL_THREAD : 0;
    e->flags |= (task_flags & PF_EXITING) ? SAMPLE_FLAG_EXITING : 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
}

#ifndef PYTHON_FRAMES
#define PYTHON_FRAMES 0
#endif
#if PYTHON_FRAMES > PYTHON_MAX_FRAMES
#error "PYTHON_FRAMES exceeds PYTHON_MAX_FRAMES"
#endif
#if PYTHON_FRAMES > 0 && !defined(TASK_FSBASE_OFFSET)
#error "PYTHON_FRAMES needs TASK_FSBASE_OFFSET (task_struct.thread.fsbase, from the kernel's BTF)"
#endif
#if PYTHON_FRAMES > 0
/* ---- Python frames, for every profiler (docs/python.md) ----
 *
 * python_procs (pid -> struct python_proc) says how to find and walk a validated Python process's
 * frames; user space writes it (agent/probes/python_maps.py) and the exit tracepoint deletes it, as
 * pids are reused. python_threads ((pid, pthread) -> PyThreadState *) is PYTHON_USE_THREAD_MAP's source.
 * The walk reads the current task's TLS base (task_struct.thread.fsbase at TASK_FSBASE_OFFSET, which user
 * space takes from the kernel's BTF: the headers BCC compiles against may not be this kernel's), then its
 * thread state, then up to PYTHON_FRAMES frames of its chain: a few bpf_probe_read_user calls per frame.
 * The loop is a bounded loop (kernel >= 5.3), not unrolled: the verifier walks each iteration either way
 * (about 1,100 instructions verified per frame), and the program stays small; each slot index is checked
 * so the verifier sees every write inside `ips`. Minimum kernel: 5.5 (bpf_probe_read_user/_kernel). */
BPF_HASH(python_procs, u32, struct python_proc, PYTHON_PROCS_ENTRIES);
BPF_HASH(python_threads, struct python_thread_key, u64, PYTHON_THREADS_ENTRIES);
/* The code keys (address and fingerprint) walked lately, by pid: a miss is new code (see walk_python).
 * Least recently used keys go; one that comes back is announced again, which costs a wakeup. */
struct python_code_seen {
    u32 pid;
    u32 padding;
    u64 code;
};
BPF_TABLE("lru_hash", struct python_code_seen, u8, python_codes_seen, PYTHON_CODES_SEEN_ENTRIES);

#define PYTHON_LAST_SLOT (2 * MAX_STACK_DEPTH + 2 * PYTHON_MAX_FRAMES - 2) /* a frame's first slot, at most */

/* The current task's TLS base (its pthread_t on glibc and musl), or 0. */
static __always_inline u64 current_fsbase(void)
{
    u64 fsbase = 0;
    u8 *task = (u8 *)bpf_get_current_task();
    if (bpf_probe_read_kernel(&fsbase, sizeof(fsbase), task + TASK_FSBASE_OFFSET) != 0)
        return 0;
    return fsbase;
}

static __always_inline int read_word(u64 *out, u64 address)
{
    return bpf_probe_read_user(out, sizeof(*out), (void *)address);
}

/* The thread's PyThreadState into *tstate (0: it has none); < 0 when its memory cannot be read. */
static __always_inline s32 python_tstate(const struct python_proc *proc, u32 pid, u64 fsbase, u64 *tstate)
{
    *tstate = 0;
    if (proc->flags & PYTHON_USE_TSS) {
        u64 slot = fsbase + proc->tls_offset;
        if (proc->tls_second_offset) {
            u64 block = 0;
            if (read_word(&block, slot) != 0)
                return PYTHON_READ_FAILED;
            slot = block ? block + proc->tls_second_offset : 0; /* no block: the key was never set here */
        }
        if (slot && read_word(tstate, slot) != 0)
            return PYTHON_READ_FAILED;
    }
    if (!*tstate && (proc->flags & PYTHON_USE_THREAD_MAP)) {
        struct python_thread_key key = {.pid = pid, .pthread = fsbase};
        u64 *found = python_threads.lookup(&key);
        if (found)
            *tstate = *found;
    }
    return 0;
}

/* The thread's innermost frame into *frame (0: none); < 0 when its memory cannot be read. */
static __always_inline s32 python_top_frame(const struct python_proc *proc, u64 tstate, u64 *frame)
{
    if (read_word(frame, tstate + proc->tstate_frame) != 0)
        return PYTHON_READ_FAILED;
    if (proc->cframe_current_frame != PYTHON_NO_FIELD && *frame && read_word(frame, *frame + proc->cframe_current_frame) != 0)
        return PYTHON_READ_FAILED;
    return 0;
}

/* 16 bits that tell apart the code objects one address held: a hash of PYTHON_FINGERPRINT_WORDS words at
 * `offset` into the code object, fields CPython fixes when it creates it (counts, first line, its own
 * tuples' and file name's addresses; PythonLayout.code_fingerprint). agent/process/python/objects.py
 * computes the same from the code object it reads. */
static __always_inline int python_fingerprint(u64 code, u16 offset, u64 *fingerprint)
{
    u64 words[PYTHON_FINGERPRINT_WORDS] = {};
    *fingerprint = 0;
    if (offset == PYTHON_NO_FIELD)
        return 0; /* no window known: user space expects 0 too */
    if (bpf_probe_read_user(words, sizeof(words), (void *)(code + offset)) != 0)
        return -1;
    u64 hash = 0;
#pragma clang loop unroll(full)
    for (int i = 0; i < PYTHON_FINGERPRINT_WORDS; i++)
        hash = (hash ^ words[i]) * PYTHON_FINGERPRINT_MULTIPLIER;
    *fingerprint = hash >> PYTHON_FINGERPRINT_SHIFT;
    return 0;
}

/* One frame's two slots: (code | fingerprint | PYTHON_FRAME_* flags, instruction); its caller into *previous. */
static __always_inline int python_frame(const struct python_proc *proc, u64 frame, u64 *word, u64 *instr, u64 *previous)
{
    u64 code = 0;
    u8 byte = 0;
    *instr = 0;
    if (read_word(&code, frame + proc->frame_code) != 0 || read_word(previous, frame + proc->frame_previous) != 0)
        return -1;
    if (proc->flags & PYTHON_INSTR_IS_INT) {
        u32 lasti = 0;
        if (bpf_probe_read_user(&lasti, sizeof(lasti), (void *)(frame + proc->frame_instr)) != 0)
            return -1;
        *instr = lasti;
    } else if (read_word(instr, frame + proc->frame_instr) != 0) {
        return -1;
    }
    if (proc->flags & PYTHON_CODE_TAGGED)
        code &= ~(u64)PYTHON_FRAME_FLAGS;
    *word = code;
    if (proc->frame_owner != PYTHON_NO_FIELD) {
        if (bpf_probe_read_user(&byte, 1, (void *)(frame + proc->frame_owner)) != 0)
            return -1;
        if (byte == proc->owner_cstack)
            *word = frame | PYTHON_FRAME_SHIM;
    }
    if (proc->frame_is_entry != PYTHON_NO_FIELD) {
        if (bpf_probe_read_user(&byte, 1, (void *)(frame + proc->frame_is_entry)) != 0)
            return -1;
        if (byte)
            *word |= PYTHON_FRAME_ENTRY;
    }
    if (!(*word & PYTHON_FRAME_SHIM)) {
        u64 fingerprint = 0;
        if (python_fingerprint(code, proc->code_fingerprint, &fingerprint) != 0)
            return -1; /* a live frame's code object is mapped: an unreadable one is a torn chain */
        *word |= fingerprint << PYTHON_FINGERPRINT_SHIFT;
    }
    return 0;
}

/* Append the current thread's Python frames to e->ips after its user frames (the stack lengths must be
 * filled), and set e->python_frames: their count, or why there are none (PYTHON_* < 0); 0 when the
 * process is not walked. A walk that meets a code object python_codes_seen does not hold says so at
 * once on proc_events (PROC_EVENT_PYTHON_CODE), which wakes the reader on each record: user space must
 * read a new code object while the process lives, and the samples that carry it may otherwise wait in
 * their buffer for a batched wakeup until after the process has exited. */
static __always_inline void walk_python(void *ctx, struct stack_event *e)
{
    e->python_frames = 0;
    if (e->flags & SAMPLE_FLAG_KERNEL_THREAD)
        return;
    u32 pid = e->pid;
    struct python_proc *proc = python_procs.lookup(&pid);
    if (!proc)
        return;
    u64 fsbase = current_fsbase();
    if (!fsbase) {
        e->python_frames = PYTHON_NO_FSBASE;
        return;
    }
    u64 tstate = 0, frame = 0;
    s32 status = python_tstate(proc, pid, fsbase, &tstate);
    if (status == 0 && !tstate)
        status = PYTHON_NO_THREAD_STATE;
    if (status == 0)
        status = python_top_frame(proc, tstate, &frame);
    if (status < 0) {
        e->python_frames = status;
        return;
    }
    s32 kernel = e->kernel_stack_len, user = e->user_stack_len;
    u32 base = (kernel > 0 ? (u32)kernel & 0x7f : 0) + (user > 0 ? (u32)user & 0x7f : 0);
    s32 n = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < PYTHON_FRAMES; i++) {
        if (!frame)
            break;
        u64 word = 0, instr = 0, previous = 0;
        if (python_frame(proc, frame, &word, &instr, &previous) != 0) {
            e->python_frames = PYTHON_READ_FAILED; /* a partial chain would put frames under wrong callers */
            return;
        }
        u32 slot = base + 2 * i;
        __asm__ __volatile__("" : "+r"(slot)); /* bound the register the store uses, not a copy */
        if (slot > PYTHON_LAST_SLOT)
            break;
        e->ips[slot] = word;
        e->ips[slot + 1] = instr;
        n = i + 1;
        frame = previous;
        if (!(word & PYTHON_FRAME_SHIM)) {
            struct python_code_seen seen = {.pid = pid, .code = word & ~(u64)PYTHON_FRAME_FLAGS};
            if (!python_codes_seen.lookup(&seen)) {
                u8 one = 1;
                python_codes_seen.update(&seen, &one);
                /* In the record, not a local: the verifier does not track it, so the paths of each
                 * frame's lookup merge again instead of doubling the states it walks per frame. */
                e->flags |= SAMPLE_FLAG_PYTHON_NEW_CODE;
            }
        }
    }
    if (frame && n == PYTHON_FRAMES)
        e->flags |= SAMPLE_FLAG_PYTHON_TRUNCATED;
    e->python_frames = n;
    if (e->flags & SAMPLE_FLAG_PYTHON_NEW_CODE) {
        struct proc_event event = {.timestamp_ns = e->timestamp_ns, .pid = pid, .kind = PROC_EVENT_PYTHON_CODE};
        proc_events.perf_submit(ctx, &event, sizeof(event));
    }
}

/* A thread exits: its pthread id may be reused by the next thread, so its python_threads entry goes. */
static __always_inline void python_thread_exit(u32 pid, u32 tid)
{
    if (tid == pid)
        python_procs.delete(&pid);
    u64 fsbase = current_fsbase();
    if (fsbase) {
        struct python_thread_key key = {.pid = pid, .pthread = fsbase};
        python_threads.delete(&key);
    }
}
#else
static __always_inline void walk_python(void *ctx, struct stack_event *e)
{
    e->python_frames = 0;
}
#endif

#if PROFILE_CPU
/* ---- CPU profiler: samples every online CPU at a fixed frequency, one record per sample ----
 *
 * Attach points: a perf_event per CPU (PERF_COUNT_HW_CPU_CYCLES where the PMU exists, else the software
 *   cpu-clock) running on_cpu_sample.
 * Output: perf buffer `cpu_samples` (struct stack_event with both stacks inline, then the Python frames,
 *   then the stack copy).
 * Minimum kernel: 4.18 (bpf_get_stack from perf_event programs). */
#ifndef CPU_STACK_BYTES
#define CPU_STACK_BYTES 0
#endif
STACK_RECORD(cpu_record, CPU_STACK_BYTES);
BPF_PERCPU_ARRAY(cpu_scratch, struct cpu_record, 1);
BPF_PERF_OUTPUT(cpu_samples);

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    if ((u32)id == 0 || pid == AGENT_PID || !pid_wanted(pid)) /* the idle task, or the agent itself */
        return 0;
    int zero = 0;
    struct cpu_record *r = cpu_scratch.lookup(&zero);
    if (!r)
        return 0;
    struct stack_event *e = &r->event;
    fill_task(e, id, bpf_ktime_get_ns());
    collect_stacks(ctx, e);
    walk_python(ctx, e);
    copy_current_user_stack(r, CPU_STACK_BYTES); /* after the frames: see stack_copy_offset */
    announce_process(ctx, pid, e->timestamp_ns, e->flags); /* first: its announcement is read first */
    cpu_samples.perf_submit(ctx, r, record_size(e, CPU_STACK_BYTES));
    return 0;
}
#endif

#if PROFILE_OFFCPU
/* ---- Off-CPU profiler: how long threads stay blocked (scheduled out while asleep), and in which stacks ----
 *
 * A block starts when a task switches out in a sleeping state (prev_state S or D) and ends when it
 * switches in again, so it includes the run-queue wait after the wake-up, as bcc's offcputime. Not
 * blocks: preemption and sched_yield (the task stays runnable: that is CPU contention, which the CPU
 * profiler sees), stopped and traced tasks, exiting tasks, and TASK_IDLE waits (kernel workers with
 * nothing to do). The idle task (pid 0) is skipped; kernel threads are kept, with no user stack.
 * Every followed block has an entry in `offcpu_start` (tid -> {switch-out time, N}) until it ends.
 *
 * Attach points (USE_KPROBE selects which one is compiled, so only one program is ever loaded):
 *   USE_KPROBE=0: the sched:sched_switch tracepoint (on_sched_switch). bpf_get_stack walks only the
 *     current task, which at sched_switch is the one leaving: the stacks must be taken at switch-out.
 *     They wait in `offcpu_stacks` (tid -> record) until the thread switches in; if the block was
 *     long enough the record is completed in place and sent from the map value. Only qualifying blocks
 *     reach the perf buffer: sending every switch-out with its stacks and completing it later would push
 *     each sub-millisecond sleep through the perf buffer and the Python decoder, which costs far more
 *     than copying the record into the map. `offcpu_stacks` is an LRU map smaller than `offcpu_start` (an entry is a
 *     whole scratch record: ~4.1 KiB, and the copy's room when unwinding with DWARF;
 *     preallocated): when more threads are blocked than it holds, the longest-idle ones lose their
 *     stacks rather than the busy ones, and a block whose stacks were evicted is counted as lost.
 *   USE_KPROBE=1: a kprobe on finish_task_switch (on_finish_task_switch; the symbol may carry an .isra.N
 *     suffix). It runs as the incoming task, whose stacks are still those it blocked in (it is returning
 *     from schedule()), so nothing but `offcpu_start` is kept and the stacks are walked only for blocks that
 *     qualify. Preemption cannot be told from a sleep there: the task's state is read instead (__state
 *     from 5.14, state before).
 * Bounding the event rate (user space writes `offcpu_params`, see PARAM_* in common.h):
 *   PARAM_SAMPLING = N (>= 1): each block is followed with probability 1/N, decided with
 *     bpf_get_prandom_u32() at switch-out so a skipped block costs no stack walk and no map entry; each
 *     record carries the N it was kept under and user space weights it by N: totals stay unbiased.
 *   PARAM_MIN_BLOCK_NS: shorter blocks are dropped at switch-in.
 * Lost data, in offcpu_lost_counts (read by user space): LOST_START_FULL, a block not followed because `offcpu_start`
 *   was full (or busy); LOST_STACKS_EVICTED, a qualifying block whose stacks were evicted from `offcpu_stacks`.
 *   Perf-buffer losses are counted by user space's lost_cb.
 * Output: perf buffer `offcpu_samples` (struct stack_event: value = blocked ns, timestamp_ns and cpu = when
 *   and where the block ended, sampling = N).
 * Minimum kernel: 4.18 (bpf_get_stack from tracepoint and kprobe programs; prev_state as reported
 *   since 4.14: S = 1, D = 2, preempted = TASK_REPORT_MAX).
 */
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

#ifndef OFFCPU_STACK_BYTES
#define OFFCPU_STACK_BYTES 0
#endif
STACK_RECORD(offcpu_record, OFFCPU_STACK_BYTES);
BPF_PERCPU_ARRAY(offcpu_scratch, struct offcpu_record, 1);
BPF_ARRAY(offcpu_params, u64, PARAM_COUNT);
BPF_ARRAY(offcpu_lost_counts, u64, LOST_COUNT);
BPF_HASH(offcpu_start, u32, struct block_start, BLOCKED_ENTRIES); /* by tid: the blocks being followed */
BPF_PERF_OUTPUT(offcpu_samples);

static __always_inline u64 offcpu_param(u32 index)
{
    u64 *value = offcpu_params.lookup(&index);
    return value ? *value : 0;
}

/* Follow a block of `tid` that starts now, with probability 1/N; true when it is followed. */
static __always_inline bool block_starts(u32 pid, u32 tid, u64 now)
{
    if (pid == AGENT_PID || !pid_wanted(pid))
        return false;
    struct block_start block = {.start_ns = now, .sampling = offcpu_param(PARAM_SAMPLING)};
    if (block.sampling <= 1)
        block.sampling = 1;
    else if (bpf_get_prandom_u32() % block.sampling != 0)
        return false;
    if (offcpu_start.update(&tid, &block) != 0) {
        offcpu_lost_counts.atomic_increment(LOST_START_FULL);
        return false;
    }
    return true;
}

/* The block of `tid` ends now: false when it was not followed. Else its start time, and its N when it
 * lasted at least the minimum (0 when it is too short to report). */
static __always_inline bool block_ends(u32 tid, u64 now, u64 *start_ns, u64 *sampling)
{
    struct block_start *block = offcpu_start.lookup(&tid);
    if (!block)
        return false;
    *start_ns = block->start_ns;
    *sampling = now - block->start_ns >= offcpu_param(PARAM_MIN_BLOCK_NS) ? block->sampling : 0;
    offcpu_start.delete(&tid);
    return true;
}

/* Who the current task is, both its stacks, its Python frames and its user stack copy after them;
 * returns the record's size. */
static __always_inline u32 offcpu_fill(void *ctx, struct offcpu_record *r, u64 id, u64 now)
{
    fill_task(&r->event, id, now);
    collect_stacks(ctx, &r->event);
    walk_python(ctx, &r->event);
    copy_current_user_stack(r, OFFCPU_STACK_BYTES);
    return record_size(&r->event, OFFCPU_STACK_BYTES);
}

static __always_inline void offcpu_submit(void *ctx, struct offcpu_record *r, u32 size, u64 now)
{
    announce_process(ctx, r->event.pid, now, r->event.flags);
    offcpu_samples.perf_submit(ctx, r, size);
}

#if !USE_KPROBE
BPF_TABLE("lru_hash", u32, struct offcpu_record, offcpu_stacks, STACK_ENTRIES); /* by tid: where it blocked */

int on_sched_switch(struct tracepoint__sched__sched_switch *args)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    int zero = 0;
    if (tid != 0 && (args->prev_state & SLEEPING_STATES) && block_starts(id >> 32, tid, now)) {
        struct offcpu_record *r = offcpu_scratch.lookup(&zero);
        if (r) {
            offcpu_fill(args, r, id, now);
            offcpu_stacks.update(&tid, r); /* evicts the least recently used entry when full */
        }
    }
    u32 next = args->next_pid;
    u64 start_ns = 0, sampling = 0;
    if (next == 0 || !block_ends(next, now, &start_ns, &sampling))
        return 0;
    struct offcpu_record *r = offcpu_stacks.lookup(&next);
    if (!r || r->event.timestamp_ns != start_ns) { /* evicted (an older entry is from an earlier block) */
        if (sampling)
            offcpu_lost_counts.atomic_increment(LOST_STACKS_EVICTED);
    } else if (sampling) {
        struct stack_event *e = &r->event;
        e->value = now - start_ns;
        e->sampling = sampling;
        e->timestamp_ns = now;
        e->cpu = bpf_get_smp_processor_id();
        offcpu_submit(args, r, record_size(e, OFFCPU_STACK_BYTES), now);
    }
    if (r)
        offcpu_stacks.delete(&next);
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
    struct offcpu_record *r = offcpu_scratch.lookup(&zero);
    if (!r)
        return 0;
    u32 size = offcpu_fill(ctx, r, id, now);
    r->event.value = now - start_ns;
    r->event.sampling = sampling;
    offcpu_submit(ctx, r, size, now);
    return 0;
}
#endif
#endif /* PROFILE_OFFCPU */

#if PROFILE_ALLOC
/* ---- Allocation profiler: samples the bytes allocated through the C library, by bytes, in the kernel ----
 *
 * Attach points: uprobes on the entry of malloc, calloc, realloc, posix_memalign and aligned_alloc in
 *   each C library file that profiled processes map (user space attaches them once per file
 *   identity, system-wide, or once per process with --pid: the kernel then filters the uprobe events
 *   by address space, so this profiler never reads the pid filter).
 * Sampling: each thread counts down a random threshold drawn from an exponential distribution of
 *   mean R = alloc_params[PARAM_SAMPLING] bytes; every allocation subtracts its size, and the allocation
 *   that takes the count below zero is sent (value = its size, sampling = R) and a new threshold is
 *   drawn. The exponential is memoryless, so each allocation of s bytes is sent with probability
 *   1 - exp(-s/R) whatever came before it, and user space weights it by the inverse (the Go/tcmalloc
 *   estimator). Everything else costs a hash lookup and a subtraction: no perf-buffer record.
 * Call sites: at a function's entry the frame pointer still belongs to the caller, so a frame-pointer
 *   walk skips the immediate caller. Its return address sits at the stack pointer; it is spliced in
 *   after the leaf (unless the kernel already did so: 6.13+ does for entries it recognises).
 * Nested calls: realloc(NULL, n) and the memalign family of glibc (and musl's posix_memalign ->
 *   aligned_alloc -> malloc) call or tail-call malloc. Such an inner call is recognised by its outer
 *   call still being on the stack, and not counted twice.
 * Output: perf buffer `alloc_samples` (struct stack_event, user stack only: the kernel stack at a uprobe
 *   is the trap handler). The exit tracepoint forgets each exiting thread's countdown.
 * Minimum kernel: 5.5 (bpf_probe_read_user; uprobes, bpf_get_stack and LRU hashes are older).
 */

#include "alloc_math.h" /* the sampling arithmetic and the call-site splicing: no maps, no helpers */

struct alloc_thread {
    s64 countdown;  /* bytes still to allocate before the next sample; below zero: sample */
    u64 mean;       /* the R the countdown was drawn with */
    u64 outer_sp;   /* entry stack pointer of the realloc/calloc/memalign call in progress, or 0 */
    u64 outer_ret;  /* its return address */
};

#ifndef ALLOC_STACK_BYTES
#define ALLOC_STACK_BYTES 0
#endif
STACK_RECORD(alloc_record, ALLOC_STACK_BYTES);
BPF_PERCPU_ARRAY(alloc_scratch, struct alloc_record, 1);
BPF_TABLE("lru_hash", u32, struct alloc_thread, alloc_threads, THREAD_ENTRIES); /* by tid */
BPF_ARRAY(alloc_params, u64, PARAM_COUNT);
BPF_PERF_OUTPUT(alloc_samples);

static __always_inline void send_sample(struct pt_regs *ctx, u32 pid, u32 tid, u64 size, u64 mean, u64 ret)
{
    int zero = 0;
    struct alloc_record *r = alloc_scratch.lookup(&zero);
    if (!r)
        return;
    struct stack_event *e = &r->event;
    e->timestamp_ns = bpf_ktime_get_ns();
    e->value = size;
    e->sampling = mean;
    e->pid = pid;
    e->tid = tid;
    e->cpu = bpf_get_smp_processor_id();
    e->flags = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    e->kernel_stack_len = 0;
    /* One frame less than the limit leaves room for the caller. */
    long user = bpf_get_stack(ctx, &e->ips[1], (MAX_STACK_DEPTH - 1) * sizeof(u64), BPF_F_USER_STACK);
    u32 n = user > 0 ? ((u32)user / sizeof(u64)) & 0x7f : 0;
    if (user < 0) {
        e->user_stack_len = (s32)user;
    } else {
        n = splice_caller(e->ips, n, ret) & 0x7f;
        e->user_stack_len = (s32)n;
    }
    walk_python(ctx, e);
    /* At a uprobe the probed registers are the user registers: unwinding starts at the entry of the
     * allocation function, whose CFI row names the caller without any splicing. The copy goes after
     * the frames (see stack_copy_offset), so the walk comes first. */
    copy_user_stack(r, ALLOC_STACK_BYTES, PT_REGS_IP(ctx), PT_REGS_SP(ctx), PT_REGS_FP(ctx));
    announce_process(ctx, pid, e->timestamp_ns, e->flags);
    alloc_samples.perf_submit(ctx, r, record_size(e, ALLOC_STACK_BYTES));
}

/* Every probe: `outer` for the functions that may call malloc themselves. */
static __always_inline int on_alloc(struct pt_regs *ctx, u64 size, int outer)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    u32 tid = (u32)id;
    if (pid == AGENT_PID)
        return 0;
    int index = PARAM_SAMPLING;
    u64 *configured = alloc_params.lookup(&index);
    u64 mean = configured && *configured ? *configured : 1;
    if (mean > MAX_MEAN)
        mean = MAX_MEAN;
    struct alloc_thread *t = alloc_threads.lookup(&tid);
    if (!t) {
        struct alloc_thread fresh = {.countdown = next_threshold(bpf_get_prandom_u32(), mean), .mean = mean};
        alloc_threads.update(&tid, &fresh);
        t = alloc_threads.lookup(&tid);
        if (!t)
            return 0;
    }
    u64 sp = PT_REGS_SP(ctx);
    u64 ret = 0; /* the return address, read only when needed: most calls are plain mallocs */
    if (outer || t->outer_sp)
        bpf_probe_read_user(&ret, sizeof(ret), (void *)sp);
    if (t->outer_sp) {
        u64 slot = 0;
        bpf_probe_read_user(&slot, sizeof(slot), (void *)t->outer_sp);
        if (is_nested_call(sp, PT_REGS_IP(ctx), ret, t->outer_sp, t->outer_ret, slot))
            return 0; /* counted at the outer call */
    }
    t->outer_sp = outer ? sp : 0;
    t->outer_ret = outer ? ret : 0;
    if (size == 0)
        return 0;
    if (size > (1ULL << 48)) /* no such allocation succeeds; keeps the arithmetic signed-safe */
        size = 1ULL << 48;
    if (t->mean != mean) { /* R changed: a threshold drawn with the new mean keeps samples exact */
        t->mean = mean;
        t->countdown = next_threshold(bpf_get_prandom_u32(), mean);
    }
    t->countdown -= (s64)size;
    if (t->countdown >= 0)
        return 0;
    t->countdown = next_threshold(bpf_get_prandom_u32(), mean);
    if (!ret)
        bpf_probe_read_user(&ret, sizeof(ret), (void *)sp);
    send_sample(ctx, pid, tid, size, mean, ret);
    return 0;
}

int on_malloc(struct pt_regs *ctx)
{
    return on_alloc(ctx, PT_REGS_PARM1(ctx), 0);
}

int on_calloc(struct pt_regs *ctx)
{
    u64 count = PT_REGS_PARM1(ctx), each = PT_REGS_PARM2(ctx);
    if (!count || !each)
        return on_alloc(ctx, 0, 1);
    u64 limit = ~0ULL / each;
    __asm__ volatile("" : "+r"(limit)); /* else clang turns the test into a 128-bit multiply BPF lacks */
    return on_alloc(ctx, count > limit ? 0 : count * each, 1); /* an overflowing calloc allocates nothing */
}

int on_realloc(struct pt_regs *ctx)
{
    return on_alloc(ctx, PT_REGS_PARM2(ctx), 1);
}

int on_posix_memalign(struct pt_regs *ctx)
{
    return on_alloc(ctx, PT_REGS_PARM3(ctx), 1);
}

int on_aligned_alloc(struct pt_regs *ctx)
{
    return on_alloc(ctx, PT_REGS_PARM2(ctx), 1);
}
#endif /* PROFILE_ALLOC */

/* ---- process lifetimes, for every profiler ---- */

/* An exec: a pid never announced has nothing in user space to retire (its next record announces the
 * new image), so only an announced one sends EXEC: under an exec storm most short processes are never
 * sampled, and an event (a wakeup) for each would cost more than all their samples. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
#if PYTHON_FRAMES > 0
    python_procs.delete(&pid); /* walked as the old image's interpreter: not this one */
#endif
    if (!known_pids.lookup(&pid))
        return 0;
    known_pids.delete(&pid);
    struct proc_event event = {.timestamp_ns = bpf_ktime_get_ns(), .pid = pid, .kind = PROC_EVENT_EXEC};
    proc_events.perf_submit(args, &event, sizeof(event));
    return 0;
}

/* Fires for every exiting thread: forget its allocation countdown and its python_threads entry; and,
 * for a whole process, its Python walk (python_procs) and its announcement (a pid reused by a forked child that never execs must be announced again, so the new
 * process's own mappings are captured). */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    u32 tid = (u32)id;
#if PROFILE_ALLOC
    alloc_threads.delete(&tid);
#endif
#if PYTHON_FRAMES > 0
    python_thread_exit(pid, tid);
#endif
    if (tid == pid)
        known_pids.delete(&pid);
    return 0;
}
