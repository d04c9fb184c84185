/* The reset vector: linked for 0xF0000 (the last 64 KiB of the first MiB,
 * also mapped at 0xFFFF0000 so that F000:FFF0 after reset reaches it).
 * Marker 0xB2 to port 0x60, then count in RAM at 0x500 like spin16. */
	.code16
	.text
	.globl _start
_start:
	xorw	%ax, %ax
	movw	%ax, %ds
	movb	$0xb2, %al
	outb	%al, $0x60
1:	incl	0x500
	jmp	1b
	.org	0xfff0
reset_vector:
	ljmp	$0xf000, $0		/* F000:0000 = GPA 0xF0000 = _start */
	.org	0x10000
