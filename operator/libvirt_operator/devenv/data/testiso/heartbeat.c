/*
 * Heartbeat of the libvirt-operator test kernel (tests/harness/test_iso.py), opt-in: only when
 * the multiboot command line contains "heartbeat" (the ISO variant built with heartbeat=True).
 *
 * Instead of halting for good, the kernel then loads its own GDT and IDT, remaps the PIC, runs
 * the PIT at ~20 Hz and sleeps in `sti; hlt`, printing "LVOP-TESTISO-TICK <n>" on COM1 about
 * once a second with a counter that lives in guest memory. A live migration test sees the
 * counter carry on from where it was on the source host (the guest kept running, it did not
 * boot again), and the ~20 wake-ups a second keep the guest's CPU use low under QEMU TCG.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3F8
#define PIT_HZ 1193182u
#define TICK_HZ 20u
#define MB_FLAG_CMDLINE (1u << 2)

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }

u32 mb_info;               /* set by kernel.S from %ebx (the multiboot information structure) */
volatile u32 hb_timer_ticks; /* incremented by irq0_stub */

/* IRQ0 (vector 0x20 after the remap): count, acknowledge. Everything else: ignore. */
__asm__(
    ".text\n"
    ".globl irq0_stub\n"
    "irq0_stub:\n"
    "    push %eax\n"
    "    incl hb_timer_ticks\n"
    "    mov $0x20, %al\n"
    "    outb %al, $0x20\n"
    "    pop %eax\n"
    "    iret\n"
    ".globl ignore_stub\n"
    "ignore_stub:\n"
    "    iret\n");
extern void irq0_stub(void);
extern void ignore_stub(void);

static u64 gdt[3] = {0, 0x00CF9A000000FFFFull, 0x00CF92000000FFFFull}; /* null, code 0x08, data 0x10 */
static u64 idt[256];
struct __attribute__((packed)) table_ptr { u16 limit; u32 base; };

static void put(const char *s)
{
    for (; *s; s++) {
        while (!(inb(COM1 + 5) & 0x20)) {
        }
        outb(COM1, (u8)*s);
    }
}

static void put_u32(u32 n)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    put(buf + i);
}

static int wanted(void)
{
    static const char word[] = "heartbeat";
    if (!mb_info || !(*(u32 *)mb_info & MB_FLAG_CMDLINE))
        return 0;
    const char *cmdline = (const char *)*(u32 *)(mb_info + 16);
    for (const char *p = cmdline; p && *p; p++) {
        u32 i = 0;
        while (word[i] && p[i] == word[i])
            i++;
        if (!word[i])
            return 1;
    }
    return 0;
}

static u64 gate(void (*handler)(void))
{
    u32 h = (u32)handler;
    return (u64)((h & 0xFFFFu) | (0x08u << 16)) | ((u64)((h & 0xFFFF0000u) | 0x8E00u) << 32);
}

void heartbeat(void)
{
    if (!wanted())
        return;
    struct table_ptr gdtr = {sizeof(gdt) - 1, (u32)gdt};
    __asm__ volatile(
        "lgdt %0\n"
        "ljmp $0x08, $1f\n"
        "1: mov $0x10, %%ax\n"
        "mov %%ax, %%ds\n mov %%ax, %%es\n mov %%ax, %%ss\n mov %%ax, %%fs\n mov %%ax, %%gs\n"
        : : "m"(gdtr) : "eax", "memory");
    for (u32 v = 0; v < 256; v++)
        idt[v] = gate(ignore_stub);
    idt[0x20] = gate(irq0_stub);
    struct table_ptr idtr = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
    /* PIC: master at 0x20, slave at 0x28, only IRQ0 unmasked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    /* PIT channel 0, rate generator */
    u32 divisor = PIT_HZ / TICK_HZ;
    outb(0x43, 0x34);
    outb(0x40, (u8)(divisor & 0xFF));
    outb(0x40, (u8)(divisor >> 8));
    put("LVOP-TESTISO-HEARTBEAT\r\n");
    u32 beat = 0;
    u32 next = TICK_HZ;
    for (;;) {
        __asm__ volatile("sti; hlt; cli" : : : "memory");
        if (hb_timer_ticks >= next) {
            next = hb_timer_ticks + TICK_HZ;
            put("LVOP-TESTISO-TICK ");
            put_u32(++beat);
            put("\r\n");
        }
    }
}
