/* 16-bit real mode, loaded at GPA 0, started with vm-sample's registers
 * (cs_sel 0xF000, cs_base 0, rip 0). Reports the hypervisor CPUID leaves. */
	.code16
	.text
	.globl _start
_start:
	movl	$0x40000000, %eax
	cpuid
	outl	%eax, $0x11		/* highest hypervisor leaf */
	movl	%ebx, %eax
	outl	%eax, $0x10		/* "ACRN" */
	movl	%ecx, %eax
	outl	%eax, $0x10
	movl	%edx, %eax
	outl	%eax, $0x10
	movl	$0x40000001, %eax
	cpuid
	outl	%eax, $0x12		/* features: bit 0 = privileged VM */
	movl	$0x40000010, %eax
	cpuid
	outl	%eax, $0x14		/* TSC kHz */
	movl	$1, %eax
	cpuid
	movl	%ecx, %eax
	outl	%eax, $0x13		/* CPUID.1:ECX, bit 31 = hypervisor present */
	movb	$1, %al
	outb	%al, $0x1f
1:	cli
	hlt
	jmp	1b
