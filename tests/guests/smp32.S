/* 32-bit protected mode BSP (pm32 registers), linked at 0x1000: wakes the AP
 * (APIC id 1) with INIT and a start-up IPI for vector 8, i.e. real-mode code at
 * 0x8000, which reports from the AP. Until then the AP must stay silent. */
	.code32
	.text
	.globl _start
_start:
	movb	$0xb5, %al
	outb	%al, $0x60		/* the BSP runs */
	movl	$0x01000000, 0xfee00310	/* ICR destination: APIC id 1 */
	movl	$0x00004500, 0xfee00300	/* INIT, level assert */
	movl	$0x01000000, 0xfee00310
	movl	$0x00004608, 0xfee00300	/* start-up, vector 8 -> 0x8000 */
	movb	$1, %al
	outb	%al, $0x1e		/* SIPI sent */
1:	cli
	hlt
	jmp	1b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
	.globl	ap_entry
ap_entry:
	movb	$0xa9, %al
	outb	%al, $0x1d		/* the AP runs */
	movb	$1, %al
	outb	%al, $0x1f
2:	cli
	hlt
	jmp	2b
