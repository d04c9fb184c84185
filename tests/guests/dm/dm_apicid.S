/* One vCPU: its LAPIC ID register and CPUID.1 APIC id, which must be the LAPIC
 * id of its pCPU (what acrn-dm wrote into the guest's MADT). */
	.include "dmguest.inc"
	multiboot_header
	entry
	print	lapic
	movl	0xfee00020, %eax
	shrl	$24, %eax
	printhex
	print	nl
	print	cpuid
	movl	$1, %eax
	cpuid
	movl	%ebx, %eax
	shrl	$24, %eax
	printhex
	print	nl
	poweroff
	routines
lapic:	.asciz	"lapic id "
cpuid:	.asciz	"cpuid apic id "
