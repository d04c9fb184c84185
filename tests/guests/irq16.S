/* 16-bit, loaded at GPA 0: programs the (in-kernel) PIC, installs a real-mode
 * handler for IRQ 1 (vector 0x21) and waits with interrupts on. The handler
 * reports on port 0x51 and acknowledges the PIC. */
	.code16
	.text
	.globl _start
_start:
	cli
	/* vm-sample's registers give CS selector 0xF000 with base 0: make the
	 * selector agree with the base, or IRET (which reloads CS the real-mode
	 * way, base = selector << 4) would return to 0xF0000 + IP. */
	ljmp	$0, $1f
1:
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %ss
	movw	$0x7000, %sp
	movw	$handler, 0x21 * 4	/* IVT[0x21] = 0000:handler */
	movw	$0, 0x21 * 4 + 2
	movb	$0x11, %al		/* ICW1: edge, cascade, ICW4 follows */
	outb	%al, $0x20
	movb	$0x20, %al		/* ICW2: vectors 0x20-0x27 */
	outb	%al, $0x21
	movb	$0x04, %al		/* ICW3: slave on IR2 */
	outb	%al, $0x21
	movb	$0x01, %al		/* ICW4: 8086 mode */
	outb	%al, $0x21
	movb	$0xfd, %al		/* OCW1: only IR1 unmasked */
	outb	%al, $0x21
	movb	$1, %al
	outb	%al, $0x50		/* ready */
	sti
2:	hlt
	jmp	2b

handler:
	pushw	%ax
	movb	$0x21, %al
	outb	%al, $0x51
	movb	$0x20, %al		/* non-specific EOI */
	outb	%al, $0x20
	popw	%ax
	iret
