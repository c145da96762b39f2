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

/* Bytes of the user stack copied into each record for DWARF unwinding in user space (cflag; a multiple
 * of USER_STACK_CHUNK). 0 compiles the copy out: frame-pointer stacks only, and records stay small. */
#ifndef USER_STACK_BYTES
#define USER_STACK_BYTES 0
#endif
#define USER_STACK_CHUNK 512
/* The agent's own process (cflag): its threads are never sampled, so profiling costs no feedback. */
#ifndef AGENT_PID
#define AGENT_PID 0
#endif

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
    /* The user registers and stack for unwinding with CFI (USER_STACK_BYTES > 0), else zero. The copy
     * starts at user_stack_base (user_sp rounded down to USER_STACK_CHUNK) and holds
     * user_stack_bytes bytes: whole chunks, up to the first unreadable one (the stack's end). */
    u64 user_ip;
    u64 user_sp;
    u64 user_bp;
    u64 user_stack_base;
    u32 user_stack_bytes;
    u32 reserved;
    u64 ips[2 * MAX_STACK_DEPTH]; /* kernel frames, then user frames, leaf first */
#if USER_STACK_BYTES > 0
    u8 stack[USER_STACK_BYTES];   /* sent whole-ips: at a fixed offset, after every slot of ips */
#endif
};

struct proc_event {
    u64 timestamp_ns;
    u32 pid;
    u32 kind;               /* PROC_EVENT_* */
};

/* Copy the registers and the top of the user stack for DWARF unwinding; returns the bytes of `e` to
 * submit (all of `ips`, then the copied chunks), or 0 when nothing is copied (USER_STACK_BYTES == 0, a
 * kernel thread, or no user registers). Chunks are read at constant offsets so the verifier sees every
 * access in bounds; the first unreadable one (past the top of the stack) ends the copy. */
static __always_inline u32 copy_user_stack(struct stack_event *e, u64 ip, u64 sp, u64 bp)
{
    e->user_ip = ip;
    e->user_sp = sp;
    e->user_bp = bp;
    e->user_stack_base = 0;
    e->user_stack_bytes = 0;
#if USER_STACK_BYTES > 0
    if (!sp || (e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        return 0;
    u64 base = sp & ~((u64)USER_STACK_CHUNK - 1);
    e->user_stack_base = base;
    u32 chunks = 0;
#pragma unroll
    for (u32 i = 0; i < USER_STACK_BYTES / USER_STACK_CHUNK; i++) {
        if (bpf_probe_read_user(&e->stack[i * USER_STACK_CHUNK], USER_STACK_CHUNK,
                                (void *)(base + i * USER_STACK_CHUNK)) != 0)
            break;
        chunks = i + 1;
    }
    e->user_stack_bytes = chunks * USER_STACK_CHUNK;
    return offsetof(struct stack_event, stack) + chunks * USER_STACK_CHUNK;
#else
    return 0;
#endif
}

/* The bytes to submit of a record filled earlier (by collect_stacks, or as alloc.bpf.c does). */
static __always_inline u64 record_size(struct stack_event *e)
{
    u64 size;
    s32 kernel = e->kernel_stack_len, user = e->user_stack_len;
    u32 nk = kernel > 0 ? (u32)kernel & 0x7f : 0;
    u32 nu = user > 0 ? (u32)user & 0x7f : 0;
    size = offsetof(struct stack_event, ips) + (nk + nu) * sizeof(u64);
#if USER_STACK_BYTES > 0
    if (e->user_stack_bytes)
        size = offsetof(struct stack_event, stack) + (u64)e->user_stack_bytes;
#endif
    /* Hide what the compiler knows, so the bound below reaches the verifier on the same register. */
    __asm__ __volatile__("" : "+r"(size));
    if (size > sizeof(struct stack_event))
        size = sizeof(struct stack_event);
    return size;
}

/* The current task's user registers, saved where it entered the kernel (or was interrupted in user
 * mode): what a perf_event or tracepoint program must unwind from. Kernel >= 5.15 (bpf_task_pt_regs). */
static __always_inline void current_user_regs(u64 *ip, u64 *sp, u64 *bp)
{
#if USER_STACK_BYTES > 0
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(ip, sizeof(*ip), &regs->ip);
    bpf_probe_read_kernel(sp, sizeof(*sp), &regs->sp);
    bpf_probe_read_kernel(bp, sizeof(*bp), &regs->bp);
#else
    *ip = *sp = *bp = 0;
#endif
}

/* Walk both stacks of the current task into e->ips, and copy the user stack when configured; returns
 * the number of bytes of `e` to submit. The masks keep every offset provably inside `ips`. */
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
    u64 ip = 0, sp = 0, bp = 0;
    if (!(e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        current_user_regs(&ip, &sp, &bp);
    u32 copied = copy_user_stack(e, ip, sp, bp);
    return copied ? copied : offsetof(struct stack_event, ips) + (nk + nu) * sizeof(u64);
}

#endif
