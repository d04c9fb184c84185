/* 32-bit protected mode (pm32 registers, linked at 0x1000; the test gives
 * GDTR/IDTR from the symbols gdt and idt): SET_IRQLINE through the IOAPIC.
 * Both PICs masked, the local APIC software-enabled with LINT0 masked, then
 * IOAPIC pin 4 -> vector 0x44 and pin 5 -> vector 0x35 (lower priority: the
 * test's fence), fixed delivery, edge-triggered, active high, to this
 * vCPU's APIC ID. A handler reports its vector on port 0x51, sends the EOI
 * and goes back to the idle loop with a fresh stack instead of IRET, which
 * this host's KVM (kvm-pvm) cannot emulate in protected mode. */
	.code32
	.text
	.globl _start
_start:
	movl	$stack_top, %esp
	movb	$0xff, %al		/* mask both PICs: GSIs 4 and 5 arrive through the IOAPIC only */
	outb	%al, $0x21
	outb	%al, $0xa1
	movl	$0x1ff, 0xfee000f0	/* LAPIC SVR: software-enabled, spurious vector 0xff */
	movl	$0x10000, 0xfee00350	/* LVT LINT0 masked */
	movl	0xfee00020, %ebx	/* LAPIC ID in bits 31:24: the entries' destination */
	andl	$0xff000000, %ebx
	movl	$0x18, 0xfec00000	/* IOREGSEL: pin 4, low dword */
	movl	$0x44, 0xfec00010	/* IOWIN: vector 0x44, fixed, physical, edge, high, unmasked */
	movl	$0x19, 0xfec00000	/* pin 4, high dword */
	movl	%ebx, 0xfec00010
	movl	$0x1a, 0xfec00000	/* pin 5 */
	movl	$0x35, 0xfec00010
	movl	$0x1b, 0xfec00000
	movl	%ebx, 0xfec00010
	movb	$1, %al
	outb	%al, $0x50		/* ready */
idle:
	movl	$stack_top, %esp	/* drop an interrupt frame: no IRET */
	sti
1:	hlt
	jmp	1b

handler44:
	movb	$0x44, %al
	outb	%al, $0x51
	movl	$0, 0xfee000b0		/* EOI */
	jmp	idle

handler35:
	movb	$0x35, %al
	outb	%al, $0x51
	movl	$0, 0xfee000b0
	jmp	idle

	.balign	8
	.globl	gdt
gdt:	.quad	0
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x10: code, flat, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
	.balign	8
	.globl	idt
idt:	.fill	0x35, 8, 0
	.word	handler35, 0x10, 0x8e00, 0	/* vector 0x35: interrupt gate (handlers < 64 KiB) */
	.fill	0x44 - 0x36, 8, 0
	.word	handler44, 0x10, 0x8e00, 0	/* vector 0x44 */
	.globl	idt_end
idt_end:
	.balign	16
	.fill	256, 4, 0
stack_top:
