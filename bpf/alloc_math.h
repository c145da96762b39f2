/* The allocation profiler's pure helpers (bpf/agent.bpf.c, PROFILE_ALLOC): the exponential threshold
 * arithmetic, the nested-call test and the call-site splicing. They use no BPF helper and no map, so
 * BCC needs no rewriting here and tests/unit/test_alloc_kernel_math.py compiles this very file with gcc. */
#ifndef PROFILING_AGENT_ALLOC_MATH_H
#define PROFILING_AGENT_ALLOC_MATH_H

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

#endif
