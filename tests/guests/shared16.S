/* 16-bit, loaded at GPA 0: RAM coherence with the client. The guest stores a
 * value at 0x600 and says so on port 0x15 (the client looks at its own copy of
 * RAM, then stores a value at 0x604 before completing that write); the guest
 * then reports what it finds at 0x604 on port 0x16. */
	.code16
	.text
	.globl _start
_start:
	xorw	%ax, %ax
	movw	%ax, %ds
	movl	$0xfeedbeef, 0x600
	movb	$1, %al
	outb	%al, $0x15
	movl	0x604, %eax
	outl	%eax, $0x16
	movb	$1, %al
	outb	%al, $0x1f
1:	cli
	hlt
	jmp	1b
