/* 16-bit, loaded at GPA 0: SET_IRQLINE through the 8259 PIC. Programs the
 * in-kernel PIC (edge-triggered, vectors 0x20-0x27), installs real-mode
 * handlers for IR1 (vector 0x21) and IR3 (vector 0x23, lower priority: the
 * test's fence), and waits with interrupts on. Each handler reports its
 * vector on port 0x51 and acknowledges the PIC. */
	.code16
	.text
	.globl _start
_start:
	cli
	ljmp	$0, $1f			/* CS selector = base (see irq16.S) */
1:
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %ss
	movw	$0x7000, %sp
	movw	$handler21, 0x21 * 4	/* IVT[0x21] = 0000:handler21 */
	movw	$0, 0x21 * 4 + 2
	movw	$handler23, 0x23 * 4
	movw	$0, 0x23 * 4 + 2
	movb	$0x11, %al		/* ICW1: edge, cascade, ICW4 follows */
	outb	%al, $0x20
	movb	$0x20, %al		/* ICW2: vectors 0x20-0x27 */
	outb	%al, $0x21
	movb	$0x04, %al		/* ICW3: slave on IR2 */
	outb	%al, $0x21
	movb	$0x01, %al		/* ICW4: 8086 mode */
	outb	%al, $0x21
	movb	$0xf5, %al		/* OCW1: IR1 and IR3 unmasked */
	outb	%al, $0x21
	movb	$0xff, %al		/* the slave: all masked */
	outb	%al, $0xa1
	movb	$1, %al
	outb	%al, $0x50		/* ready */
	sti
2:	hlt
	jmp	2b

handler21:
	pushw	%ax
	movb	$0x21, %al
	outb	%al, $0x51
	movb	$0x20, %al		/* non-specific EOI */
	outb	%al, $0x20
	popw	%ax
	iret				/* real mode: kvm-pvm emulates this one */

handler23:
	pushw	%ax
	movb	$0x23, %al
	outb	%al, $0x51
	movb	$0x20, %al
	outb	%al, $0x20
	popw	%ax
	iret
