/* Allocation profiler: samples the bytes allocated through the C library, by bytes, in the kernel.
 *
 * Attach points: uprobes on the entry of malloc, calloc, realloc, posix_memalign and aligned_alloc in
 *   each C library file that profiled processes map (user space attaches them once per file
 *   identity, system-wide, or once per process with a pid filter); tracepoints
 *   sched:sched_process_exec and sched:sched_process_exit.
 * Sampling: each thread counts down a random threshold drawn from an exponential distribution of
 *   mean R = params[PARAM_SAMPLING] bytes; every allocation subtracts its size, and the allocation
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
 * Output: perf buffer `samples` (struct stack_event, user stack only: the kernel stack at a uprobe is
 *   the trap handler) and perf buffer `proc_events` (struct proc_event, as cpu.bpf.c).
 * Minimum kernel: 5.5 (bpf_probe_read_user; uprobes, bpf_get_stack and LRU hashes are older).
 *
 * Compile-time parameters (cflags): KNOWN_PIDS_ENTRIES, FILTER_PIDS (0/1; the agent passes 0: with --pid
 *   its uprobes are attached to those processes only), THREAD_ENTRIES,
 *   AGENT_PID (never sampled), USER_STACK_BYTES (user stack copied for DWARF unwinding; 0: none).
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include "common.h"

/* ---- begin: pure helpers (no BPF helpers or maps; tests/unit/test_alloc_kernel_math.py compiles them) ---- */

/* ln(1+f) for f in [0, 1) as Q30 fixed point: a degree-6 least-squares polynomial on Chebyshev nodes,
 * coefficients of f^1..f^6 times 2^30. Maximum error 1.7e-6. */
#define LN1P_C1 1073622548LL
#define LN1P_C2 (-534404483LL)
#define LN1P_C3 340245014LL
#define LN1P_C4 (-206414603LL)
#define LN1P_C5 90407592LL
#define LN1P_C6 (-19196240LL)
#define LN2_Q30 744261118LL /* ln(2) * 2^30 */
#define Q30 30

/* floor(log2(v)) for v >= 1 */
static __always_inline u32 floor_log2(u64 v)
{
    u32 p = 0;
    if (v >> 32) { v >>= 32; p += 32; }
    if (v >> 16) { v >>= 16; p += 16; }
    if (v >> 8) { v >>= 8; p += 8; }
    if (v >> 4) { v >>= 4; p += 4; }
    if (v >> 2) { v >>= 2; p += 2; }
    if (v >> 1) { p += 1; }
    return p;
}

/* -ln(U) in Q16 for U = (random + 1) / 2^32, uniform in (0, 1]: an Exp(1) quantile, no floats.
 * With v = random + 1 = 2^p (1 + f): -ln(U) = (32 - p) ln 2 - ln(1 + f). The error is at most
 * 1.7e-6 (polynomial) + 2^-16 (truncation to Q16) = 1.7e-5 in absolute terms; the largest value,
 * 32 ln 2 = 22.2, cuts the tail at a probability of 2^-32. */
static __always_inline u64 exp1_quantile_q16(u32 random)
{
    u64 v = (u64)random + 1;
    u32 p = floor_log2(v);
    u64 rest = v - (1ULL << p);
    s64 f = p >= Q30 ? (s64)(rest >> (p - Q30)) : (s64)(rest << (Q30 - p)); /* f in Q30 */
    s64 acc = LN1P_C6;
    acc = ((acc * f) >> Q30) + LN1P_C5;
    acc = ((acc * f) >> Q30) + LN1P_C4;
    acc = ((acc * f) >> Q30) + LN1P_C3;
    acc = ((acc * f) >> Q30) + LN1P_C2;
    acc = ((acc * f) >> Q30) + LN1P_C1;
    s64 ln1p = (acc * f) >> Q30;
    s64 quantile = (s64)(32 - p) * LN2_Q30 - ln1p;
    return quantile > 0 ? (u64)quantile >> 14 : 0;
}

/* The next threshold: floor(Exp(mean)) bytes. mean <= MAX_MEAN keeps the product below 2^62. */
#define MAX_MEAN (1ULL << 40) /* the alloc.sample_bytes setting's bound */
static __always_inline s64 next_threshold(u32 random, u64 mean)
{
    return (s64)((exp1_quantile_q16(random) * mean) >> 16);
}

#define NEST_STACK_SPAN 65536     /* an inner call runs at most this far below its outer call's entry */
#define NEST_TEXT_SPAN (8 << 20)  /* ...and is called from inside the same library (its text is smaller) */

/* Is a call entering at (sp, ip), returning to ret, made from inside the outer allocator call that
 * entered at outer_sp, returning to outer_ret? `outer_slot` is what the stack holds at outer_sp now:
 * while the outer call runs, its return address is still there. A tail call from the outer function
 * enters at the very same sp with the same return address; any other inner call is deeper and returns
 * into the library. */
static __always_inline int is_nested_call(u64 sp, u64 ip, u64 ret, u64 outer_sp, u64 outer_ret, u64 outer_slot)
{
    if (!outer_sp || outer_slot != outer_ret || sp > outer_sp || outer_sp - sp >= NEST_STACK_SPAN)
        return 0;
    if (sp == outer_sp)
        return ret == outer_ret;
    u64 distance = ret > ip ? ret - ip : ip - ret;
    return distance < NEST_TEXT_SPAN;
}

/* ips[1..n] holds a user stack walked at a function entry: ips[1] the entry itself, then the return
 * addresses the frame pointers lead to. Make ips[0..] the stack with the immediate caller `ret`
 * right after the leaf; returns its length (at most n + 1). When the kernel already put the caller
 * there, or `ret` could not be read (0), the frames only move down by one. */
static __always_inline u32 splice_caller(u64 *ips, u32 n, u64 ret)
{
    if (n == 0)
        return 0;
    if (ret != 0 && (n < 2 || ips[2] != ret)) {
        ips[0] = ips[1];
        ips[1] = ret;
        return n + 1;
    }
    for (u32 i = 0; i < MAX_STACK_DEPTH - 1; i++) {
        if (i >= n)
            break;
        ips[i] = ips[i + 1];
        __asm__ volatile("" ::: "memory"); /* keep a loop: BPF cannot call memmove */
    }
    return n;
}

/* ---- end: pure helpers ---- */

struct alloc_thread {
    s64 countdown;  /* bytes still to allocate before the next sample; below zero: sample */
    u64 mean;       /* the R the countdown was drawn with */
    u64 outer_sp;   /* entry stack pointer of the realloc/calloc/memalign call in progress, or 0 */
    u64 outer_ret;  /* its return address */
};

BPF_PERCPU_ARRAY(scratch, struct stack_event, 1); /* records are too big for the 512-byte BPF stack */
BPF_TABLE("lru_hash", u32, u8, known_pids, KNOWN_PIDS_ENTRIES); /* processes already announced */
BPF_HASH(pid_filter, u32, u8, 4096);                            /* used only when FILTER_PIDS */
BPF_TABLE("lru_hash", u32, struct alloc_thread, threads, THREAD_ENTRIES); /* by tid */
BPF_ARRAY(params, u64, PARAM_COUNT);
BPF_PERF_OUTPUT(samples);
BPF_PERF_OUTPUT(proc_events);

/* Copied from cpu.bpf.c: BCC rewrites map method calls only in the program's own file. */
static __always_inline void announce_process(void *ctx, u32 pid, u64 now)
{
    u8 one = 1;
    if (known_pids.lookup(&pid))
        return;
    known_pids.update(&pid, &one);
    struct proc_event event = {.timestamp_ns = now, .pid = pid, .kind = PROC_EVENT_NEW};
    proc_events.perf_submit(ctx, &event, sizeof(event));
}

static __always_inline void send_sample(struct pt_regs *ctx, u32 pid, u32 tid, u64 size, u64 mean, u64 ret)
{
    int zero = 0;
    struct stack_event *e = scratch.lookup(&zero);
    if (!e)
        return;
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
    /* At a uprobe the probed registers are the user registers: unwinding starts at the entry of the
     * allocation function, whose CFI row names the caller without any splicing. */
    copy_user_stack(e, PT_REGS_IP(ctx), PT_REGS_SP(ctx), PT_REGS_FP(ctx));
    samples.perf_submit(ctx, e, record_size(e));
    announce_process(ctx, pid, e->timestamp_ns);
}

/* Every probe: `outer` for the functions that may call malloc themselves. */
static __always_inline int on_alloc(struct pt_regs *ctx, u64 size, int outer)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    u32 tid = (u32)id;
    if (pid == AGENT_PID)
        return 0;
#if FILTER_PIDS
    if (!pid_filter.lookup(&pid))
        return 0;
#endif
    int index = PARAM_SAMPLING;
    u64 *configured = params.lookup(&index);
    u64 mean = configured && *configured ? *configured : 1;
    if (mean > MAX_MEAN)
        mean = MAX_MEAN;
    struct alloc_thread *t = threads.lookup(&tid);
    if (!t) {
        struct alloc_thread fresh = {.countdown = next_threshold(bpf_get_prandom_u32(), mean), .mean = mean};
        threads.update(&tid, &fresh);
        t = threads.lookup(&tid);
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

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    known_pids.delete(&pid);
    struct proc_event event = {.timestamp_ns = bpf_ktime_get_ns(), .pid = pid, .kind = PROC_EVENT_EXEC};
    proc_events.perf_submit(args, &event, sizeof(event));
    return 0;
}

/* Fires for every exiting thread: forget its countdown; and, for a whole process, its announcement
 * (a reused pid must be announced again). */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    u32 tid = (u32)id;
    threads.delete(&tid);
    if (tid == pid)
        known_pids.delete(&pid);
    return 0;
}
