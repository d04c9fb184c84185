/* 32-bit protected mode BSP (pm32 registers), linked at 0x1000: reports its
 * LAPIC ID register (0xFEE00020 bits 31:24) on port 0x10 and its CPUID.1
 * initial APIC id (EBX bits 31:24) on port 0x11, then starts every other vCPU
 * (INIT and a start-up IPI for vector 8, shorthand "all excluding self": the
 * only form PVM hosts deliver). An AP reports its CPUID.1 APIC id on port 0x12
 * from real mode at 0x8000. The BSP ends with "done" on 0x1F once an AP spoke
 * (the AP sets the byte at 0x7000), or at once for a single vCPU (port 0x13
 * says how many vCPUs to wait for, as the test writes it into RAM at 0x7004). */
	.code32
	.text
	.globl _start
_start:
	movl	0xfee00020, %eax
	shrl	$24, %eax
	outb	%al, $0x10
	movl	$1, %eax
	cpuid
	movl	%ebx, %eax
	shrl	$24, %eax
	outb	%al, $0x11
	cmpb	$2, 0x7004
	jb	2f
	movl	$0x000c4500, 0xfee00300	/* INIT, all excluding self */
	movl	$0x000c4608, 0xfee00300	/* start-up, vector 8 -> 0x8000 */
1:	cmpb	$0, 0x7000
	je	1b
2:	movb	$1, %al
	outb	%al, $0x1f
3:	cli
	hlt
	jmp	3b

	.code16
	.org	0x7000			/* 0x1000 + 0x7000 = 0x8000 */
	.globl	ap_entry
ap_entry:
	movl	$1, %eax
	cpuid
	movl	%ebx, %eax
	shrl	$24, %eax
	outb	%al, $0x12
	xorw	%ax, %ax
	movw	%ax, %ds
	movb	$1, 0x7000
4:	cli
	hlt
	jmp	4b
