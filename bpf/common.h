/* Structs that cross the kernel/user boundary, shared by the profilers in bpf/agent.bpf.c, and the helpers that
 * fill them. Their ctypes mirrors live in agent/probes/records.py; tests/unit/test_records_layout.py
 * checks that sizeof and every field offset agree. Keep fields naturally aligned, padding explicit.
 *
 * Stacks travel inside each record (bpf_get_stack, kernel >= 4.18) rather than as ids into a
 * BPF_STACK_TRACE map: such a map answers -EEXIST for every later stack that hashes to an occupied
 * bucket, so one early collision can cost a hot stack all its samples for the rest of an interval,
 * and an id read after its bucket was reused names the wrong stack. A record sends only what it filled:
 * the header, its kernel and user frames, its Python frames, then (unwind.<profiler> auto or dwarf) its
 * user stack copy right after them. A typical record is a few hundred bytes, or the copy and a few
 * hundred bytes with one (about 8.4 KiB with the default 8 KiB): unfilled slots are never sent. */
#ifndef PROFILING_AGENT_COMMON_H
#define PROFILING_AGENT_COMMON_H

#define AGENT_COMM_LEN 16
#define MAX_STACK_DEPTH 127 /* the kernel's PERF_MAX_STACK_DEPTH */

/* Each profiler copies its own number of user stack bytes into its records for DWARF unwinding in user
 * space (cflags CPU_STACK_BYTES, OFFCPU_STACK_BYTES, ALLOC_STACK_BYTES: multiples of USER_STACK_CHUNK up
 * to MAX_USER_STACK_BYTES). 0 compiles the copy out: frame-pointer stacks only, and records stay small. */
#define USER_STACK_CHUNK 512
#define MAX_USER_STACK_BYTES 32768 /* the unwind.stack_bytes setting's bound */
/* The agent's own process (cflag): its threads are never sampled, so profiling costs no feedback. */
#ifndef AGENT_PID
#define AGENT_PID 0
#endif

/* stack_event.flags */
#define SAMPLE_FLAG_KERNEL_THREAD 1   /* the task has no user address space: no user stack to walk */
#define SAMPLE_FLAG_PYTHON_TRUNCATED 2 /* the Python walk stopped at PYTHON_FRAMES with callers left */
#define SAMPLE_FLAG_PYTHON_NEW_CODE 4  /* the walk met a code object python_codes_seen did not hold */
#define SAMPLE_FLAG_EXITING 8          /* the task is exiting (PF_EXITING): the rest of do_exit */

/* Python frames (docs/python.md). A profiler walks the sampled thread's CPython frame chain when its
 * process is in `python_procs`, and appends the frames to `ips` after the user frames, two slots each,
 * leaf first: (code object address | PYTHON_FRAME_* flags, instruction) where the instruction is the
 * frame's f_lasti (3.10, an index) or its instruction pointer as read (3.11+). The first slot's top 16
 * bits hold the code object's fingerprint (python_fingerprint): CPython frees code objects (a module's
 * body after its import) and reuses their addresses, so the address alone does not say which object a
 * sample ran. For a C-stack shim frame the first slot holds the shim frame's own address instead. */
#define PYTHON_MAX_FRAMES 128         /* python.max_frames' bound; the walk's own limit is PYTHON_FRAMES */
#define PYTHON_FRAME_ENTRY 1          /* 3.11: the first frame of one _PyEval_EvalFrameDefault call */
#define PYTHON_FRAME_SHIM 2           /* 3.12+: a frame owned by the C stack (the shim an eval call pushes) */
#define PYTHON_FRAME_FLAGS 7          /* code objects are 8-byte aligned: the low bits carry the flags */
#define PYTHON_FINGERPRINT_SHIFT 48   /* user addresses are below 2^47: the top bits carry the fingerprint */
#define PYTHON_FINGERPRINT_WORDS 8    /* the fingerprint hashes this many words at python_proc.code_fingerprint */
#define PYTHON_FINGERPRINT_MULTIPLIER 0x9e3779b97f4a7c15ULL /* 2^64 / golden ratio: spreads bits upwards */
/* stack_event.python_frames when < 0: why a Python process's event has no Python frames */
#define PYTHON_NO_THREAD_STATE (-1)   /* the thread has no thread state (not a Python thread, or idle) */
#define PYTHON_READ_FAILED (-2)       /* reading the interpreter's memory faulted */
#define PYTHON_NO_FSBASE (-3)         /* the thread's TLS base could not be read */
/* python_proc.flags */
#define PYTHON_USE_TSS 1              /* tstate from the thread's pthread-specific slot (3.10-3.13) */
#define PYTHON_USE_THREAD_MAP 2       /* tstate from python_threads (3.14+, and the fallback of every version) */
#define PYTHON_CODE_TAGGED 4          /* the frame's code field is a tagged _PyStackRef (3.14+): clear its low bits */
#define PYTHON_INSTR_IS_INT 8         /* the frame's instruction field is an int index (3.10's f_lasti) */
#define PYTHON_NO_FIELD 0xffff        /* an offset the version does not have */

/* proc_event.kind */
#define PROC_EVENT_NEW 1  /* first sample of a process (or first after exec): capture its mappings now */
#define PROC_EVENT_EXEC 2 /* the process replaced its image: mappings captured earlier are stale */
#define PROC_EVENT_PYTHON_CODE 3 /* a Python walk met a code object it had not met lately: read the events */

/* Indices into each profiler's `<profiler>_params` array (u64), written by user space: the adaptive sampler
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
    /* The user registers and stack for unwinding with CFI (the profiler copies the stack), else zero.
     * The copy is of the memory from user_stack_base (user_sp rounded down to USER_STACK_CHUNK) on, and
     * holds user_stack_bytes bytes: whole chunks, up to the first unreadable one (the stack's end). It
     * lies right after the record's last filled slot of ips (its last Python frame, else its last user
     * frame), at offsetof(ips) + 8 * (kernel + user + 2 * python frames): see stack_copy_offset. */
    u64 user_ip;
    u64 user_sp;
    u64 user_bp;
    u64 user_stack_base;
    u32 user_stack_bytes;
    s32 python_frames;      /* Python frames after the user frames in ips (two slots each), or PYTHON_* < 0 */
    /* kernel frames, then user frames, leaf first; then the Python frames (two slots each); then the
     * user stack copy, if any, which runs on into the record's room (STACK_RECORD) */
    u64 ips[2 * MAX_STACK_DEPTH + 2 * PYTHON_MAX_FRAMES];
};

/* A profiler's record as it fills it (in a per-CPU scratch map: records are too big for the 512-byte BPF
 * stack): a stack_event and `bytes` more, so that a copy of up to `bytes` fits after every slot filled.
 * The copy starts after the filled slots, not at `room`: with few frames most of it lies inside ips.
 * One layout per profiler, since each copies its own amount; `struct stack_event` (mirrored in
 * agent/probes/records.py) is the same in all of them. */
#define STACK_RECORD(name, bytes) \
    struct name {                 \
        struct stack_event event; \
        u8 room[bytes];           \
    }

/* python_procs' value, by pid: how to find and walk one Python process's frames, written by user space
 * (agent/process/python) once the process is validated. Offsets are into the interpreter's structs. */
struct python_proc {
    u64 tls_offset;          /* PYTHON_USE_TSS: the slot holding tstate is at fsbase + tls_offset ... */
    u64 tls_second_offset;   /* ... or, when nonzero, block = *(fsbase + tls_offset), slot = block + this */
    u32 flags;               /* PYTHON_USE_* and the layout's PYTHON_* flags */
    u16 tstate_frame;        /* PyThreadState: frame (3.10), cframe (3.11, 3.12), current_frame (3.13+) */
    u16 cframe_current_frame; /* _PyCFrame.current_frame (3.11, 3.12), else PYTHON_NO_FIELD */
    u16 frame_previous;      /* f_back (3.10), previous */
    u16 frame_code;          /* f_code, f_executable (3.13+) */
    u16 frame_instr;         /* f_lasti (3.10), prev_instr (3.11, 3.12), instr_ptr (3.13+) */
    u16 frame_is_entry;      /* 3.11: is_entry (a u8), else PYTHON_NO_FIELD */
    u16 frame_owner;         /* 3.12+: owner (a u8), else PYTHON_NO_FIELD */
    u16 code_fingerprint;    /* PyCodeObject: 8 words of fields fixed at its creation (PythonLayout) */
    u8 owner_cstack;         /* the owner value of C-stack shim frames (FRAME_OWNED_BY_CSTACK) */
    u8 padding[3];
};

/* python_threads' key (PYTHON_USE_THREAD_MAP): a thread by its pthread id (its TLS base, fsbase). */
struct python_thread_key {
    u32 pid;
    u32 padding;
    u64 pthread;
};

/* NEW also says where the image lies and which executable it runs, so that a process gone before user
 * space could read its maps is laid out from an earlier process of the same executable
 * (agent/process/templates.py): its executable's text and its mmap region (shared libraries, the
 * dynamic loader) are each randomized as a whole. 0 where unknown (no BTF offsets, a failed read). */
struct proc_event {
    u64 timestamp_ns;
    u32 pid;
    u32 kind;               /* PROC_EVENT_* */
    u64 start_code;         /* mm->start_code: the executable's text */
    u64 mmap_base;          /* mm->mmap_base: the top of the mmap region */
    u64 vdso;               /* mm->context.vdso */
    u64 exe_ino;            /* mm->exe_file's inode number */
    u32 exe_dev;            /* and its superblock's s_dev (the kernel's dev_t encoding) */
    u32 padding;
    char comm[AGENT_COMM_LEN];
};

/* Bytes from a record's start to the end of its last filled slot: its kernel and user frames and its
 * Python frames (the lengths must be filled). This is where its user stack copy starts, and all it sends
 * without one. Masked and clamped so the verifier sees it inside `ips` whatever the fields hold. */
static __always_inline u64 stack_copy_offset(const struct stack_event *e)
{
    s32 kernel = e->kernel_stack_len, user = e->user_stack_len, python = e->python_frames;
    u32 nk = kernel > 0 ? (u32)kernel & 0x7f : 0;
    u32 nu = user > 0 ? (u32)user & 0x7f : 0;
    u32 np = python > 0 ? (u32)python & 0xff : 0; /* two slots each, after the user frames */
    /* 64 bits: a u32 would be zero-extended into a second register after the bound is checked on the
     * first. Hide what the compiler knows, so the bound below reaches the verifier on the same register. */
    u64 offset = offsetof(struct stack_event, ips) + (u64)(nk + nu + 2 * np) * sizeof(u64);
    __asm__ __volatile__("" : "+r"(offset));
    if (offset > sizeof(struct stack_event))
        offset = sizeof(struct stack_event);
    return offset;
}

/* Copy the registers and the top of the user stack into `record` (a profiler's STACK_RECORD, whose room
 * holds `stack_bytes`) right after its filled slots, for DWARF unwinding: call it once the native stacks
 * and the Python frames are in. Returns the bytes of the record to submit (the filled slots, then the
 * copied chunks), or 0 when nothing is copied (stack_bytes == 0, a kernel thread, or no user registers).
 * `stack_bytes` is a constant of the calling profiler: the loop unrolls to its chunks, each read at a
 * constant distance from the copy's bounded start, so the verifier sees every access inside the record;
 * the first unreadable chunk (past the stack's top) ends it. */
static __always_inline u32 copy_user_stack(void *record, u32 stack_bytes, u64 ip, u64 sp, u64 bp)
{
    struct stack_event *e = (struct stack_event *)record;
    e->user_ip = ip;
    e->user_sp = sp;
    e->user_bp = bp;
    e->user_stack_base = 0;
    e->user_stack_bytes = 0;
    if (stack_bytes == 0 || !sp || (e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        return 0;
    u64 offset = stack_copy_offset(e);
    u8 *stack = (u8 *)record + offset;
    u64 base = sp & ~((u64)USER_STACK_CHUNK - 1);
    e->user_stack_base = base;
    u32 chunks = 0;
#pragma unroll
    for (u32 i = 0; i < MAX_USER_STACK_BYTES / USER_STACK_CHUNK; i++) {
        if (i >= stack_bytes / USER_STACK_CHUNK)
            break;
        if (bpf_probe_read_user(&stack[i * USER_STACK_CHUNK], USER_STACK_CHUNK,
                                (void *)(base + i * USER_STACK_CHUNK)) != 0)
            break;
        chunks = i + 1;
    }
    e->user_stack_bytes = chunks * USER_STACK_CHUNK;
    return offset + chunks * USER_STACK_CHUNK;
}

/* The bytes to submit of a record filled earlier (by collect_stacks, or as the allocation profiler does,
 * the Python walker and copy_user_stack) whose profiler copies `stack_bytes` of user stack: the filled
 * slots of `ips`, then the copy when there is one. */
static __always_inline u64 record_size(struct stack_event *e, u32 stack_bytes)
{
    u64 size = stack_copy_offset(e);
    if (stack_bytes)
        size += e->user_stack_bytes;
    /* Hide what the compiler knows, so the bound below reaches the verifier on the same register. */
    __asm__ __volatile__("" : "+r"(size));
    if (size > sizeof(struct stack_event) + stack_bytes)
        size = sizeof(struct stack_event) + stack_bytes;
    return size;
}

/* The current task's user registers, saved where it entered the kernel (or was interrupted in user
 * mode): what a perf_event or tracepoint program must unwind from. Kernel >= 5.15 (bpf_task_pt_regs). */
static __always_inline void current_user_regs(u64 *ip, u64 *sp, u64 *bp)
{
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(ip, sizeof(*ip), &regs->ip);
    bpf_probe_read_kernel(sp, sizeof(*sp), &regs->sp);
    bpf_probe_read_kernel(bp, sizeof(*bp), &regs->bp);
}

/* Walk both stacks of the current task into e->ips (the Python frames, if any, go after them: see
 * walk_python); returns the bytes they fill, header included. The masks keep every offset provably
 * inside `ips`. */
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

/* Copy `stack_bytes` of the current task's user stack into `record` after its filled slots (a constant
 * of the calling profiler: 0 compiles the copy and the register reads out, so kernels without
 * bpf_task_pt_regs load it); returns what copy_user_stack does. */
static __always_inline u32 copy_current_user_stack(void *record, u32 stack_bytes)
{
    struct stack_event *e = (struct stack_event *)record;
    u64 ip = 0, sp = 0, bp = 0;
    if (stack_bytes && !(e->flags & SAMPLE_FLAG_KERNEL_THREAD))
        current_user_regs(&ip, &sp, &bp);
    return copy_user_stack(record, stack_bytes, ip, sp, bp);
}

#endif
