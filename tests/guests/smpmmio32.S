/* Every vCPU writes one byte at 0x20000 (not RAM) forever (benchmarks): the
 * MMIO twin of smppio32.S, started the same way (BSP in pm32 at 0x1000, the
 * APs by INIT and start-up IPI in real mode at 0x8000). */
	.code32
	.text
	.globl _start
_start:
	movl	$0x000c4500, 0xfee00300	/* INIT, level assert, all excluding self */
	movl	$0x000c4608, 0xfee00300	/* start-up, vector 8 -> 0x8000 */
	movb	$0x41, %al
1:	movb	%al, 0x20000
	jmp	1b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
	.globl	ap_entry
ap_entry:
	movw	$0x2000, %ax
	movw	%ax, %es
	movb	$0x41, %al
2:	movb	%al, %es:0
	jmp	2b
