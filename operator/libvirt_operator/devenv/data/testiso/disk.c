/*
 * Disk marker of the libvirt-operator test kernel (tests/harness/test_iso.py).
 *
 * Looks for the first virtio block device on the PCI bus (legacy/transitional interface, I/O
 * BAR 0: what QEMU gives a <disk bus='virtio'> on the i440fx machine), reads sector 0 and prints
 * on COM1 whether it starts with the marker, then writes the marker there and flushes it (a
 * qcow2 write QEMU only caches would be lost when the domain is powered off). A snapshot test
 * thereby sees, at each boot, whether the disk still holds what an earlier boot wrote.
 * No disk: prints LVOP-TESTISO-NO-DISK and does nothing else. Polling only (interrupts stay off).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3F8
#define MARKER "LVOP-DISK-MARKER"
#define VIRTIO_VENDOR 0x1AF4
#define VIRTIO_BLK_LEGACY 0x1001
/* legacy virtio PCI registers (offsets in BAR 0) */
#define VP_HOST_FEATURES 0x00
#define VP_GUEST_FEATURES 0x04
#define VP_QUEUE_PFN 0x08
#define VP_QUEUE_NUM 0x0C
#define VP_QUEUE_SEL 0x0E
#define VP_QUEUE_NOTIFY 0x10
#define VP_STATUS 0x12
#define VIRTIO_BLK_F_FLUSH (1u << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define DESC_NEXT 1
#define DESC_WRITE 2

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline void barrier(void) { __asm__ volatile("lock; addl $0, (%%esp)" : : : "memory"); }

static void put(const char *s)
{
    for (; *s; s++) {
        while (!(inb(COM1 + 5) & 0x20)) {
        }
        outb(COM1, (u8)*s);
    }
}

static u32 pci_read(u32 bus, u32 dev, u32 off)
{
    outl(0xCF8, 0x80000000u | (bus << 16) | (dev << 11) | (off & 0xFC));
    return inl(0xCFC);
}

static void pci_write(u32 bus, u32 dev, u32 off, u32 value)
{
    outl(0xCF8, 0x80000000u | (bus << 16) | (dev << 11) | (off & 0xFC));
    outl(0xCFC, value);
}

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct req { u32 type; u32 reserved; u64 sector; };

static u8 ring[32768] __attribute__((aligned(4096)));
static u8 sector[512] __attribute__((aligned(16)));
static struct req header;
static volatile u8 req_status;
static u16 io, qsize, used_seen;
static struct desc *descs;
static volatile u16 *avail;
static volatile u16 *used_idx;

static int find_disk(void)
{
    for (u32 bus = 0; bus < 4; bus++)
        for (u32 dev = 0; dev < 32; dev++) {
            u32 id = pci_read(bus, dev, 0);
            if ((id & 0xFFFF) != VIRTIO_VENDOR || (id >> 16) != VIRTIO_BLK_LEGACY)
                continue;
            u32 bar = pci_read(bus, dev, 0x10);
            if (!(bar & 1))
                continue;
            pci_write(bus, dev, 0x04, pci_read(bus, dev, 0x04) | 0x5); /* I/O space + bus master */
            io = (u16)(bar & ~3u);
            return 1;
        }
    return 0;
}

static int setup(void)
{
    outb(io + VP_STATUS, 0);
    outb(io + VP_STATUS, 1 | 2); /* ACKNOWLEDGE | DRIVER */
    outl(io + VP_GUEST_FEATURES, inl(io + VP_HOST_FEATURES) & VIRTIO_BLK_F_FLUSH);
    outw(io + VP_QUEUE_SEL, 0);
    qsize = inw(io + VP_QUEUE_NUM);
    if (qsize == 0 || qsize > 1024)
        return 0;
    u32 avail_end = 16u * qsize + 6u + 2u * qsize;
    u32 used_off = (avail_end + 4095u) & ~4095u;
    if (used_off + 6u + 8u * qsize > sizeof(ring))
        return 0;
    descs = (struct desc *)ring;
    avail = (volatile u16 *)(ring + 16u * qsize);
    used_idx = (volatile u16 *)(ring + used_off + 2);
    avail[0] = 1; /* VRING_AVAIL_F_NO_INTERRUPT */
    outl(io + VP_QUEUE_PFN, (u32)ring >> 12);
    outb(io + VP_STATUS, 1 | 2 | 4); /* DRIVER_OK */
    return 1;
}

/* One request, waited for by polling the used ring; 0 on success. */
static int request(u32 type, u64 lba)
{
    header.type = type;
    header.reserved = 0;
    header.sector = lba;
    req_status = 0xFF;
    descs[0] = (struct desc){(u32)&header, sizeof(header), DESC_NEXT, 1};
    if (type == T_FLUSH) {
        descs[1] = (struct desc){(u32)&req_status, 1, DESC_WRITE, 0};
    } else {
        descs[1] = (struct desc){(u32)sector, 512, DESC_NEXT | (type == T_IN ? DESC_WRITE : 0), 2};
        descs[2] = (struct desc){(u32)&req_status, 1, DESC_WRITE, 0};
    }
    u16 idx = avail[1];
    avail[2 + idx % qsize] = 0;
    barrier();
    avail[1] = (u16)(idx + 1);
    barrier();
    outw(io + VP_QUEUE_NOTIFY, 0);
    for (u32 spins = 0; *used_idx == used_seen; spins++) {
        if (spins > 200000000u)
            return -1;
        __asm__ volatile("pause");
    }
    used_seen++;
    barrier();
    return req_status;
}

void disk_marker(void)
{
    static const char marker[] = MARKER;
    if (!find_disk()) {
        put("LVOP-TESTISO-NO-DISK\r\n");
        return;
    }
    if (!setup() || request(T_IN, 0) != 0) {
        put("LVOP-TESTISO-DISK-ERROR\r\n");
        return;
    }
    int present = 1;
    for (u32 i = 0; i < sizeof(marker) - 1; i++)
        if (sector[i] != (u8)marker[i])
            present = 0;
    put(present ? "LVOP-TESTISO-MARKER-PRESENT\r\n" : "LVOP-TESTISO-MARKER-ABSENT\r\n");
    for (u32 i = 0; i < sizeof(marker) - 1; i++)
        sector[i] = (u8)marker[i];
    if (request(T_OUT, 0) != 0 || request(T_FLUSH, 0) != 0) {
        put("LVOP-TESTISO-DISK-ERROR\r\n");
        return;
    }
    put("LVOP-TESTISO-MARKER-WRITTEN\r\n");
}
