/* 16-bit, loaded at GPA 0 (vm-sample registers): marker 0xA1 to port 0x60,
 * then count in RAM at 0x500 forever, without any I/O. */
	.code16
	.text
	.globl _start
_start:
	xorw	%ax, %ax
	movw	%ax, %ds
	movb	$0xa1, %al
	outb	%al, $0x60
1:	incl	0x500
	jmp	1b
