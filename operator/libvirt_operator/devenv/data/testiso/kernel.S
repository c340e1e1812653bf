/*
 * A tiny multiboot (v1) kernel for the libvirt-operator test ISO.
 * GRUB loads it in 32-bit protected mode; it writes a marker line to COM1 (0x3F8),
 * already set up by GRUB's "serial" command, then halts with interrupts off, so the
 * booted guest uses almost no CPU (unless its command line asks for a heartbeat: heartbeat.c).
 */
    .set MB_MAGIC,    0x1BADB002
    .set MB_FLAGS,    0
    .set MB_CHECKSUM, -(MB_MAGIC + MB_FLAGS)
    .set COM1,        0x3F8

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long MB_CHECKSUM

    .section .text
    .code32
    .globl _start
_start:
    cli
    mov     $stack_top, %esp
    mov     %ebx, mb_info       /* heartbeat.c reads the multiboot command line */
    mov     $message, %esi
next_char:
    lodsb
    test    %al, %al
    jz      done
    mov     %al, %bl
wait_thr:                       /* wait until the transmit holding register is empty */
    mov     $(COM1 + 5), %dx
    inb     %dx, %al
    test    $0x20, %al
    jz      wait_thr
    mov     %bl, %al
    mov     $COM1, %dx
    outb    %al, %dx
    jmp     next_char
done:
    call    disk_marker         /* disk.c: report and write the disk marker, if there is a disk */
    call    heartbeat           /* heartbeat.c: never returns when the command line asks for it */
halt:
    cli
    hlt
    jmp     halt

    .section .rodata
message:
    .asciz  "\r\nLVOP-TESTISO-KERNEL-OK\r\n"

    .section .bss
    .align 16
    .skip 4096
stack_top:
