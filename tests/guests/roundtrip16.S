/* 16-bit: read a port, write what was read plus one to the next port, for
 * each width; then a string OUT and a string IN. Loaded at GPA 0. */
	.code16
	.text
	.globl _start
_start:
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	inb	$0x30, %al
	incb	%al
	outb	%al, $0x31
	inw	$0x32, %ax
	incw	%ax
	outw	%ax, $0x33
	inl	$0x34, %eax
	incl	%eax
	outl	%eax, $0x35
	/* rep outsb: "ACRN" to port 0x40, one byte at a time */
	cld
	movw	$msg, %si
	movw	$4, %cx
	movw	$0x40, %dx
	rep outsb
	/* rep insw: two words from port 0x41 into buf, then report them */
	movw	$buf, %di
	movw	$2, %cx
	movw	$0x41, %dx
	rep insw
	movl	buf, %eax
	outl	%eax, $0x42
	movb	$1, %al
	outb	%al, $0x1f
1:	cli
	hlt
	jmp	1b
msg:	.ascii	"ACRN"
	.balign	4
buf:	.long	0
