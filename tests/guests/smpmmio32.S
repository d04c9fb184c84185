/* Every vCPU writes one byte at 0x20000 (not RAM) forever (benchmarks): the
 * MMIO twin of smppio32.S; the APs reach 0x20000 through ES = 0x2000. */
	.include "smpstart.inc"
	smp_entry
1:	movb	%al, 0x20000
	jmp	1b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
ap_entry:
	movw	$0x2000, %ax
	movw	%ax, %es
	movb	$0x41, %al
2:	movb	%al, %es:0
	jmp	2b
