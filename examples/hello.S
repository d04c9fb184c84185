/*
 * hello.S: a 16-bit real-mode guest that prints "hello\n" on COM1 and halts.
 *
 * Loaded at 0x7C00 by examples/launch.py (which assembles it with
 * `as --32` and links it flat with `ld -m elf_i386 -Ttext 0x7c00
 * --oformat binary`). It polls the line status register (0x3FD) for an
 * empty transmitter before each byte, as an early console does.
 */
	.code16
	.text
	.globl	_start
_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	$msg, %si
next:
	movb	(%si), %bl
	testb	%bl, %bl
	jz	done
	movw	$0x3fd, %dx		/* LSR */
wait:
	inb	%dx, %al
	testb	$0x20, %al		/* THRE */
	jz	wait
	movw	$0x3f8, %dx		/* THR */
	movb	%bl, %al
	outb	%al, %dx
	incw	%si
	jmp	next
done:
	hlt
	jmp	done
msg:
	.asciz	"hello\n"
