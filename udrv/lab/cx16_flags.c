/*
 * Does CMPXCHG16B leave RFLAGS as the SDM says? (Intel SDM Vol. 2A, CMPXCHG8B/CMPXCHG16B:
 * "The ZF flag is set if the destination operand and RDX:RAX are equal; otherwise it is
 * cleared. The CF, PF, AF, SF, and OF flags are unaffected.")
 *
 * QEMU 7.2's TCG computes the flags of CMPXCHG16B in a helper from the lazily tracked
 * condition-code state without first storing the translator's current state: after a POPF
 * at the end of one block and a CMP in the next, it takes the CMP's source operand (here
 * RDI) for the whole of RFLAGS. PUSHFQ then shows bits no x86-64 CPU sets (IOPL, NT, VM,
 * bits 22-31); an interrupt taken there pushes them into its frame and IRET loads NT, IOPL
 * and AC into the kernel's RFLAGS. Linux's SLUB allocator uses CMPXCHG16B on every kmalloc
 * fast path (this_cpu_try_cmpxchg128), which is how the lab guest died (udrv issue 13).
 *
 * The lab boots its guest kernel with clearcpuid=cx16 (udrv/lab/cpu.py); this probe runs in
 * user space, which keeps the instruction, and so shows the bug in every lab guest.
 *
 * Exit status: 0 when RFLAGS are right or the CPU does not offer CMPXCHG16B, 1 otherwise.
 */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>

/* RDI of the guest panic's oops (issue 13): a kmalloc-2k object in the direct map. */
#define RDI_VALUE 0xff28445f4ad27000ull

static uint64_t probe(int succeed)
{
    static __attribute__((aligned(16))) uint64_t mem[2];
    uint64_t flags, rax = succeed ? 1 : 3, rdx = 2;

    mem[0] = 1;
    mem[1] = 2;
    __asm__ volatile(
        "pushq $0x202\n\t"
        "popfq\n\t"              /* the flags now come from a POPF ... */
        "jmp 1f\n"               /* ... and the translation block ends */
        "1:\n\t"
        "cmpq %%rdi, %%rsi\n\t"  /* a CMP whose source operand is RDI */
        "cmpxchg16b (%[m])\n\t"
        "pushfq\n\t"
        "popq %[f]\n\t"
        : [f] "=&r"(flags), "+a"(rax), "+d"(rdx)
        : [m] "r"(mem), "D"(RDI_VALUE), "S"(0x1000ull), "b"(5ull), "c"(6ull)
        : "memory", "cc");
    return flags;
}

int main(void)
{
    /* Never visible in RFLAGS at CPL 3 in 64-bit mode: IOPL (0 for user processes), NT,
     * bit 15, RF, VM, VIF, VIP, bits 22-31 (SDM Vol. 1, 3.4.3). */
    const uint64_t impossible = 0x3000 | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x80000 |
                                0x100000 | 0xffc00000ull;
    unsigned int a, b, c, d;
    int bad = 0;

    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_CMPXCHG16B)) {
        printf("CMPXCHG16B: not offered by this CPU (CPUID.01H:ECX.CX16 = 0)\n");
        return 0;
    }
    for (int succeed = 0; succeed < 2; succeed++) {
        uint64_t f = probe(succeed);
        printf("CMPXCHG16B %s: RFLAGS %#010llx%s\n", succeed ? "succeeded" : "failed",
               (unsigned long long)f, f & impossible ? " <- bits no x86-64 CPU sets" : "");
        bad |= !!(f & impossible);
    }
    return bad;
}
