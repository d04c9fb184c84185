/* 16-bit: MMIO to guest-physical addresses outside RAM (RAM is 64 KiB at 0),
 * then PCI configuration through 0xCF8/0xCFC. Loaded at GPA 0. */
	.code16
	.text
	.globl _start
_start:
	movw	$0x2000, %ax
	movw	%ax, %es		/* es base 0x20000: not RAM */
	movl	$0x12345678, %es:0x10	/* MMIO write, 4 bytes at 0x20010 */
	movb	$0x5a, %es:0x31		/* MMIO write, 1 byte at 0x20031 */
	movw	%es:0x20, %ax		/* MMIO read, 2 bytes at 0x20020 */
	outw	%ax, $0x36
	/* PCI config: bus 0, device 3, function 2, register 0x10 */
	movl	$0x80001a10, %eax
	movw	$0xcf8, %dx
	outl	%eax, %dx
	movw	$0xcfc, %dx
	inl	%dx, %eax		/* -> PCICFG read, reg 0x10, 4 bytes */
	outl	%eax, $0x37
	movw	$0xcfe, %dx
	movb	$0x77, %al
	outb	%al, %dx		/* -> PCICFG write, reg 0x12, 1 byte */
	movw	$0xcf8, %dx
	inl	%dx, %eax		/* CF8 reads are answered by the hypervisor */
	outl	%eax, $0x38
	movb	$1, %al
	outb	%al, $0x1f
1:	cli
	hlt
	jmp	1b
