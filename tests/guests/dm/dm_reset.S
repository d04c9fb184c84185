/* Reset through 0xCF9 (bit 2, a system reset): acrn-dm resets the VM and loads
 * the guest again. RAM outside the ELF survives, so a counter at 6 MiB tells
 * the boots apart: the first resets, the second powers off. */
	.include "dmguest.inc"
	.set	COUNTER, 0x600000
	multiboot_header
	entry
	print	boot
	movl	COUNTER, %eax
	printhex
	print	nl
	cmpl	$0, COUNTER
	jne	1f
	movl	$1, COUNTER
	movb	$0x06, %al		/* system reset */
	movw	$0xcf9, %dx
	outb	%al, %dx
2:	hlt
	jmp	2b
1:	print	bye
	poweroff
	routines
boot:	.asciz	"boot "
bye:	.asciz	"bye\n"
