/* 32-bit protected mode (pm32 registers, IDT limit 0), linked at 0x1000: says
 * hello on port 0x60, then raises an exception that cannot be delivered:
 * #UD -> #GP -> double fault -> triple fault (shutdown). */
	.code32
	.text
	.globl _start
_start:
	movb	$0xc3, %al
	outb	%al, $0x60
	ud2
1:	jmp	1b
