/* Two vCPUs (--cpu_affinity with two LAPIC ids): the BSP reports its LAPIC ID
 * register, copies a real-mode trampoline to 0x8000 and starts the other vCPU
 * with INIT and a start-up IPI (vector 8; shorthand "all excluding self", the
 * form PVM hosts deliver). The AP stores its CPUID.1 APIC id at 0x7004 and sets
 * the flag at 0x7000; the BSP reports it and powers off. */
	.include "dmguest.inc"
	.set	FLAG, 0x7000
	.set	AP_ID, 0x7004
	multiboot_header
	entry
	movl	$0, FLAG
	print	bsp
	movl	0xfee00020, %eax
	shrl	$24, %eax
	printhex
	print	nl
	movl	$ap_start, %esi		/* the trampoline to 0x8000 */
	movl	$0x8000, %edi
	movl	$(ap_end - ap_start), %ecx
	cld
	rep movsb
	movl	$0x000c4500, 0xfee00300	/* INIT, all excluding self */
	movl	$0x000c4608, 0xfee00300	/* start-up, vector 8 -> 0x8000 */
	movl	$0x01000000, %ecx	/* give up after this many polls */
1:	cmpl	$0, FLAG
	jne	2f
	pause
	loop	1b
	print	none
	poweroff
2:	print	ap
	movl	AP_ID, %eax
	printhex
	print	nl
	poweroff
	routines

	.code16
ap_start:
	movl	$1, %eax
	cpuid
	shrl	$24, %ebx
	xorw	%ax, %ax
	movw	%ax, %ds
	movl	%ebx, AP_ID
	movl	$1, FLAG
3:	cli
	hlt
	jmp	3b
ap_end:
	.code32
bsp:	.asciz	"bsp apic "
ap:	.asciz	"ap apic "
none:	.asciz	"no ap\n"
