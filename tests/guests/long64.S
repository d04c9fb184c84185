/* 64-bit long mode, entered directly through SET_VCPU_REGS with page tables
 * the test built (identity map of the first 1 GiB and of 0xC0000000-0xFFFFFFFF).
 * Linked at 0x1000. */
	.code64
	.text
	.globl _start
_start:
	movabsq	$0x1122334455667788, %rax
	movq	%rax, 0xd0000008	/* MMIO write, 8 bytes */
	movq	%rax, %rbx
	shrq	$32, %rbx
	movl	%ebx, %eax
	outl	%eax, $0x10		/* high half */
	movq	0xd0000010, %rax	/* MMIO read, 8 bytes */
	movq	%rax, %rbx
	outl	%eax, $0x11		/* low half of what was read */
	shrq	$32, %rbx
	movl	%ebx, %eax
	outl	%eax, $0x12		/* high half */
	movb	$1, %al
	outb	%al, $0x1f
1:	cli
	hlt
	jmp	1b
