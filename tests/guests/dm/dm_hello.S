/* UART output, PCI config of the hostbridge (00:00.0) and the LPC bridge
 * (00:01.0), the RTC (register B, then a write to the seconds register), an
 * MMIO hole, then power-off through PM1a_CNT. */
	.include "dmguest.inc"
	multiboot_header
	entry
	print	hello
	print	pci0
	movl	$0x80000000, %eax	/* 00:00.0 reg 0: vendor | device << 16 */
	call	pci_read
	printhex
	print	nl
	print	pci1
	movl	$0x80000800, %eax	/* 00:01.0 */
	call	pci_read
	printhex
	print	nl
	print	class1
	movl	$0x80000808, %eax	/* 00:01.0 reg 8: revision, class */
	call	pci_read
	printhex
	print	nl
	print	rtcb
	movb	$0x0b, %al
	outb	%al, $0x70
	inb	$0x71, %al
	movzbl	%al, %eax
	printhex
	print	nl
	movb	$0x00, %al		/* seconds := 0x30 (BCD 30): an RTC write */
	outb	%al, $0x70
	movb	$0x30, %al
	outb	%al, $0x71
	print	hole
	movl	0xd0000000, %eax	/* nothing there: all ones */
	printhex
	print	nl
	print	bye
	poweroff
	routines
hello:	.asciz	"acrn-hsm-emu guest: hello\n"
pci0:	.asciz	"pci 00:00.0 "
pci1:	.asciz	"pci 00:01.0 "
class1:	.asciz	"class 00:01.0 "
rtcb:	.asciz	"rtc b "
hole:	.asciz	"mmio hole "
bye:	.asciz	"bye\n"
