/* Every vCPU writes port 0x10 forever (benchmarks). The BSP (pm32 registers,
 * linked at 0x1000) starts the APs, which run the same loop in real mode from
 * 0x8000. */
	.include "smpstart.inc"
	smp_entry
1:	outb	%al, $0x10
	jmp	1b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
ap_entry:
	movb	$0x41, %al
2:	outb	%al, $0x10
	jmp	2b
