/* COM1's interrupt: the guest routes IOAPIC pin 4 to vector 0x24 on its own
 * LAPIC, masks the PIC, enables the UART's "transmitter empty" interrupt and
 * waits. acrn-dm raises GSI 4 (SET_IRQLINE, a value-argument ioctl: under FUSE
 * only through the launcher); the handler reports and powers off, without
 * returning. Without the interrupt the guest says so after a while. */
	.include "dmguest.inc"
	.set	IDT, 0x80000
	.set	VECTOR, 0x24
	.set	IOAPIC, 0xfec00000
	.set	LAPIC, 0xfee00000
	multiboot_header
	entry
	print	hello
	movl	$IDT, %edi		/* IDT[VECTOR] = 32-bit interrupt gate to handler */
	movl	$handler, %eax
	movw	%ax, VECTOR * 8(%edi)
	movw	$0x08, VECTOR * 8 + 2(%edi)
	movw	$0x8e00, VECTOR * 8 + 4(%edi)
	shrl	$16, %eax
	movw	%ax, VECTOR * 8 + 6(%edi)
	lidt	idtr
	movb	$0xff, %al		/* PIC: everything masked */
	outb	%al, $0x21
	outb	%al, $0xa1
	movl	LAPIC + 0xf0, %eax	/* LAPIC software enable, spurious vector 0xff */
	orl	$0x1ff, %eax
	movl	%eax, LAPIC + 0xf0
	movl	LAPIC + 0x20, %ebx	/* our APIC id, bits 31:24 */
	movl	$0x19, IOAPIC		/* pin 4, high: destination */
	movl	%ebx, IOAPIC + 0x10
	movl	$0x18, IOAPIC		/* pin 4, low: fixed, physical, edge, unmasked */
	movl	$VECTOR, IOAPIC + 0x10
	sti
	movb	$0x02, %al		/* IER: transmitter holding register empty */
	movw	$COM1 + 1, %dx
	outb	%al, %dx
	movl	$0x00080000, %ecx
1:	pause
	loop	1b
	cli
	print	none
	poweroff
handler:
	movb	$0, %al			/* IER off: no more interrupts */
	movw	$COM1 + 1, %dx
	outb	%al, %dx
	print	got
	poweroff
	routines
	.align	8
idtr:	.word	0x7ff
	.long	IDT
hello:	.asciz	"waiting for IRQ 4\n"
got:	.asciz	"irq 4 -> vector 0x24 handled\n"
none:	.asciz	"no interrupt\n"
