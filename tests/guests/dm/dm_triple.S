/* A triple fault: an IDT of limit 0 makes #UD undeliverable (#UD -> #GP ->
 * double fault -> shutdown). ACRN then sends acrn-dm an S5 write to
 * PM1a_CNT, which it takes for a power-off. */
	.include "dmguest.inc"
	multiboot_header
	entry
	print	hello
	lidt	idt0
	ud2
1:	jmp	1b
	routines
	.align	8
idt0:	.word	0
	.long	0
hello:	.asciz	"about to triple fault\n"
