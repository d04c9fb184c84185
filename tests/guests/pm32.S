/* 32-bit protected mode, entered directly through SET_VCPU_REGS (cs 0x10 flat,
 * gdt/idt from the registers: the guest never loads them). Linked at 0x1000. */
	.code32
	.text
	.globl _start
_start:
	movl	$0xc0de3232, %eax
	outl	%eax, $0x10		/* a 32-bit value: the mode works */
	movl	$0x11223344, 0xd0000000	/* MMIO write above 1 MiB, 4 bytes */
	movl	0xd0000010, %eax	/* MMIO read, 4 bytes */
	incl	%eax
	outl	%eax, $0x11
	/* local APIC: software-enable it (spurious vector 0xff) */
	movl	$0x1ff, 0xfee000f0
	movb	$1, %al
	outb	%al, $0x50		/* ready */
	sti
1:	hlt
	jmp	1b

	.globl	handler
handler:
	pushl	%eax
	movb	$0x41, %al
	outb	%al, $0x51		/* the vector */
	movl	$0, 0xfee000b0		/* EOI */
	movb	$1, %al
	outb	%al, $0x1f
	popl	%eax
	iret

	.balign	8
	.globl	gdt
gdt:	.quad	0
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x10: code, flat, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
gdt_end:
	.balign	8
	.globl	idt
idt:	.fill	0x41, 8, 0
	.word	handler - 0, 0x10, 0x8e00, 0	/* vector 0x41: interrupt gate (handler < 64 KiB) */
idt_end:
