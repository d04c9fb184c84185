/* Every vCPU writes port 0x10 forever (benchmarks). 32-bit protected mode BSP
 * (pm32 registers), linked at 0x1000: INIT and a start-up IPI for vector 8 to
 * all other vCPUs (destination shorthand "all excluding self"), then the loop;
 * the APs run the same loop in real mode from 0x8000. */
	.code32
	.text
	.globl _start
_start:
	movl	$0x000c4500, 0xfee00300	/* INIT, level assert, all excluding self */
	movl	$0x000c4608, 0xfee00300	/* start-up, vector 8 -> 0x8000 */
	movb	$0x41, %al
1:	outb	%al, $0x10
	jmp	1b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
	.globl	ap_entry
ap_entry:
	movb	$0x41, %al
2:	outb	%al, $0x10
	jmp	2b
