/* 16-bit, loaded at GPA 0: a 1-byte MMIO write to 0x20000 (not RAM) in a loop. */
	.code16
	.text
	.globl _start
_start:
	movw	$0x2000, %ax
	movw	%ax, %es
	movb	$0x41, %al
1:	movb	%al, %es:0
	jmp	1b
