/*
 * ext_irqfd_guest: a 32-bit protected-mode guest that reports the MSIs it gets.
 *
 * Entered directly through SET_VCPU_REGS (cs 0x10 flat 32-bit, data 0x18,
 * GDTR/IDTR pointing at `gdt` and `idt` below: the guest never loads them),
 * linked at 0x1000 (tests/test_eventfd_kvm.py builds it with binutils and
 * finds the symbols with nm). It software-enables its local APIC, writes 1 to
 * port 0x50 ("ready"), enables interrupts and halts. The handler of vector
 * 0x41 writes the vector to port 0x51 and signals EOI.
 */
	.code32
	.text
	.globl	_start
_start:
	movl	$0x8000, %esp
	movl	$0x1ff, 0xfee000f0	/* spurious vector register: APIC on, vector 0xff */
	movb	$1, %al
	outb	%al, $0x50		/* ready */
	sti
1:	hlt
	jmp	1b

	.globl	handler
handler:
	pushl	%eax
	movb	$0x41, %al
	outb	%al, $0x51		/* the vector we were called for */
	movl	$0, 0xfee000b0		/* EOI */
	popl	%eax
	iret

	.balign	8
	.globl	gdt
gdt:	.quad	0
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x10: code, flat, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
	.globl	gdt_end
gdt_end:
	.balign	8
	.globl	idt
idt:	.fill	0x41, 8, 0
	.word	handler, 0x10, 0x8e00, 0	/* vector 0x41: 32-bit interrupt gate */
	.globl	idt_end
idt_end:
