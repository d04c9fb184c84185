/* 16-bit, loaded at GPA 0: a PIO write to port 0x10 in a loop (benchmarks). */
	.code16
	.text
	.globl _start
_start:
	movb	$0x41, %al
1:	outb	%al, $0x10
	jmp	1b
