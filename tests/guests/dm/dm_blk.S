/* virtio-blk (legacy PCI, 00:03.0): the guest reads sector 0 and writes sector 1
 * through one virtqueue, polling the used ring (no interrupt needed). With an
 * iothread acrn-dm registers the queue's kick as an ioeventfd, flagged ASYNCIO:
 * under the acrn-kernel profile each kick then travels through the asyncio ring.
 * Reports: the device id, the queue size, sector 0's first 16 bytes, the status
 * of each request. */
	.include "dmguest.inc"
	.set	VRING, 0x200000		/* desc, avail, then used on the next page */
	.set	HDR, 0x210000
	.set	DATA, 0x211000
	.set	STATUS, 0x212000
	.set	QSZ_AT, 0x7000		/* the queue size, saved */
	.set	BASE_AT, 0x7004		/* BAR0's I/O base */
	multiboot_header
	entry
	print	hello
	movl	$0x80001800, %eax	/* 00:03.0 reg 0 */
	call	pci_read
	print	devid
	printhex
	print	nl
	cmpl	$0x10011af4, %eax
	jne	fail
	movl	$0x80001810, %eax	/* BAR0 */
	call	pci_read
	andl	$0xfffc, %eax
	movl	%eax, BASE_AT
	movl	$0x80001804, %eax	/* command: I/O space, bus master */
	movl	$0x00000005, %ecx
	call	pci_write
	movl	BASE_AT, %edx		/* status: reset, then ACKNOWLEDGE | DRIVER */
	addl	$0x12, %edx
	movb	$0, %al
	outb	%al, %dx
	movb	$3, %al
	outb	%al, %dx
	movl	BASE_AT, %edx		/* guest features: none */
	addl	$4, %edx
	xorl	%eax, %eax
	outl	%eax, %dx
	movl	BASE_AT, %edx		/* queue 0 */
	addl	$0xe, %edx
	xorw	%ax, %ax
	outw	%ax, %dx
	movl	BASE_AT, %edx
	addl	$0xc, %edx
	inw	%dx, %ax
	movzwl	%ax, %eax
	movl	%eax, QSZ_AT
	print	qsz
	printhex
	print	nl
	movl	$VRING, %edi		/* clear the ring and the buffers */
	xorl	%eax, %eax
	movl	$(0x13000 / 4), %ecx
	cld
	rep stosl
	movl	BASE_AT, %edx		/* queue PFN */
	addl	$8, %edx
	movl	$(VRING >> 12), %eax
	outl	%eax, %dx
	movl	BASE_AT, %edx		/* DRIVER_OK */
	addl	$0x12, %edx
	movb	$7, %al
	outb	%al, %dx

	/* request 1: read sector 0 */
	movl	$0, HDR			/* VIRTIO_BLK_T_IN */
	movl	$0, HDR + 4
	movl	$0, HDR + 8		/* sector */
	movl	$0, HDR + 12
	movl	$2, %ebx		/* data descriptor: device writes */
	call	submit
	print	read
	movl	$DATA, %esi		/* 16 bytes of sector 0 as text */
	movl	$16, %ecx
1:	lodsb
	call	putc
	loop	1b
	print	nl
	print	st
	movzbl	STATUS, %eax
	printhex
	print	nl

	/* request 2: write sector 1 */
	movl	$DATA, %edi
	movl	$wmsg, %esi
	movl	$(wmsg_end - wmsg), %ecx
	rep movsb
	movl	$1, HDR			/* VIRTIO_BLK_T_OUT */
	movl	$1, HDR + 8		/* sector 1 */
	movl	$0, %ebx		/* data descriptor: device reads */
	call	submit
	print	wrote
	movzbl	STATUS, %eax
	printhex
	print	nl
	print	bye
	poweroff
fail:	print	nodev
	poweroff

/* one request, descriptors 0-2 (header, 512-byte data with flags NEXT | EBX,
 * status); returns once the used index moved or reports a timeout */
submit:
	movl	QSZ_AT, %ecx
	shll	$4, %ecx		/* avail = desc + 16 * qsz */
	leal	VRING(%ecx), %edi
	movb	$0xff, STATUS
	movl	$HDR, VRING		/* desc[0]: header */
	movl	$0, VRING + 4
	movl	$16, VRING + 8
	movw	$1, VRING + 12		/* NEXT */
	movw	$1, VRING + 14
	movl	$DATA, VRING + 16	/* desc[1]: data */
	movl	$0, VRING + 20
	movl	$512, VRING + 24
	orl	$1, %ebx
	movw	%bx, VRING + 28
	movw	$2, VRING + 30
	movl	$STATUS, VRING + 32	/* desc[2]: status, device writes */
	movl	$0, VRING + 36
	movl	$1, VRING + 40
	movw	$2, VRING + 44
	movw	$0, VRING + 46
	movzwl	2(%edi), %eax		/* avail.ring[idx % qsz] = 0, then idx + 1 */
	movl	%eax, %ebp
	xorl	%edx, %edx
	divl	QSZ_AT
	movw	$0, 4(%edi, %edx, 2)
	incl	%ebp
	movw	%bp, 2(%edi)
	movl	BASE_AT, %edx		/* kick queue 0 */
	addl	$0x10, %edx
	xorw	%ax, %ax
	outw	%ax, %dx
	movl	QSZ_AT, %esi		/* used ring: desc + avail, rounded up to a page */
	imull	$18, %esi
	addl	$(6 + 4095), %esi
	andl	$~4095, %esi
	addl	$VRING, %esi
	movl	$0x00800000, %ecx
2:	movzwl	2(%esi), %eax
	cmpl	%ebp, %eax
	je	3f
	pause
	loop	2b
	print	timeout
3:	ret
	routines
hello:	.asciz	"virtio-blk guest\n"
devid:	.asciz	"00:03.0 "
qsz:	.asciz	"queue size "
read:	.asciz	"sector 0: "
st:	.asciz	"read status "
wrote:	.asciz	"write status "
bye:	.asciz	"bye\n"
nodev:	.asciz	"no virtio-blk at 00:03.0\n"
timeout: .asciz	"request timed out\n"
wmsg:	.ascii	"written by the guest through virtio-blk"
wmsg_end:
