/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * acrn_hsm_emu.h - extension ioctls of acrn-hsm-emu's /dev/acrn_hsm
 *
 * The emulated node speaks the ACRN ioctl ABI of <linux/acrn.h> (type 0xA2)
 * unchanged. These extra ioctls, with their own type byte, let a process
 * other than the VM's creator serve part of the VM's I/O: it binds an open
 * file to an existing VM, creates a named "range client" with a request page
 * of its own, and registers the port I/O, MMIO and PCI ranges it emulates.
 * It then waits with the standard ACRN_IOCTL_ATTACH_IOREQ_CLIENT and
 * completes with the standard ACRN_IOCTL_NOTIFY_REQUEST_FINISH on that file.
 *
 * Every argument is a fixed-size struct whose whole content travels in the
 * _IOC_SIZE of its command, so the ioctls work through FUSE restricted
 * ioctls as well as CUSE. All reserved fields must be zero (else EINVAL).
 * The real kernel driver does not know these commands: on it they fail with
 * ENOTTY (EINVAL on a file without a VM), which is how a client can tell.
 *
 * ACRN_EMU_IOCTL_VALUE_CALL carries an ACRN ioctl whose argument is a value
 * (SET_IRQLINE) by pointer, which FUSE restricted ioctls cannot pass as it
 * is; acrn-hsm-emu's launcher (acrn-hsm-emu run -- CMD) issues it for
 * unmodified programs.
 *
 * Full description: docs/extension-abi.md in the acrn-hsm-emu sources.
 */
#ifndef _ACRN_HSM_EMU_H
#define _ACRN_HSM_EMU_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define ACRN_EMU_IOCTL_TYPE		0xA3	/* ACRN's own is 0xA2 */

#define ACRN_EMU_ABI_MAJOR		1
#define ACRN_EMU_ABI_MINOR		1

/* acrn_emu_version.features */
#define ACRN_EMU_FEATURE_BIND		(1U << 0)
#define ACRN_EMU_FEATURE_RANGE_CLIENT	(1U << 1)
#define ACRN_EMU_FEATURE_PCI_RANGES	(1U << 2)
#define ACRN_EMU_FEATURE_VALUE_CALL	(1U << 3)

/* Range types: the same numbers as ACRN_IOREQ_TYPE_PORTIO/MMIO/PCICFG. */
#define ACRN_EMU_RANGE_PIO		0
#define ACRN_EMU_RANGE_MMIO		1
#define ACRN_EMU_RANGE_PCI		2

/* A PCI range's start and end are bus/device/function numbers packed as here. */
#define ACRN_EMU_PCI_BDF(bus, dev, func) \
	((((__u64)(bus) & 0xff) << 8) | (((__u64)(dev) & 0x1f) << 3) | ((__u64)(func) & 0x7))

#define ACRN_EMU_NAME_LEN		16	/* a client name, NUL included */
#define ACRN_EMU_MAX_RANGES		64	/* per range client */

/**
 * struct acrn_emu_version - what the node implements (any file, any time)
 * @major:	ACRN_EMU_ABI_MAJOR of the daemon (out)
 * @minor:	ACRN_EMU_ABI_MINOR of the daemon (out)
 * @features:	ACRN_EMU_FEATURE_* bits (out)
 * @reserved:	zero (out)
 */
struct acrn_emu_version {
	__u32	major;
	__u32	minor;
	__u32	features;
	__u32	reserved;
};

/**
 * struct acrn_emu_bind - bind this open file to an existing VM
 * @vmid:	the VM, as CREATE_VM returned it to its creator (in)
 * @vcpu_num:	its vCPU count: request slots 0..vcpu_num-1 are used (out)
 * @flags:	zero (in)
 * @owner_uid:	uid of the process that created the VM (out)
 * @reserved:	zero (in)
 */
struct acrn_emu_bind {
	__u16	vmid;
	__u16	vcpu_num;
	__u32	flags;
	__u32	owner_uid;
	__u32	reserved;
};

/**
 * struct acrn_emu_range_client - create this file's range client
 * @name:	NUL-terminated, 1..15 characters, unique within the VM
 * @ioreq_buf:	address of the client's own 4 KiB request page (the page
 *		containing it, as for acrn_vm_creation.ioreq_buf); it has
 *		the layout of struct acrn_io_request_buffer, one slot per vCPU
 * @flags:	zero
 * @reserved:	zero
 */
struct acrn_emu_range_client {
	char	name[ACRN_EMU_NAME_LEN];
	__u64	ioreq_buf;
	__u32	flags;
	__u32	reserved;
};

/**
 * struct acrn_emu_range - one range of a range client, ends inclusive
 * @type:	ACRN_EMU_RANGE_PIO, _MMIO or _PCI
 * @reserved:	zero
 * @start:	first port / guest physical address / ACRN_EMU_PCI_BDF()
 * @end:	last one (>= start; PIO and PCI ranges end at 0xffff at most)
 *
 * A request matches when the whole access lies inside the range (PIO,
 * MMIO), or when its bus/device/function lies inside it (PCI config
 * accesses, after the 0xCF8/0xCFC folding).
 */
struct acrn_emu_range {
	__u32	type;
	__u32	reserved;
	__u64	start;
	__u64	end;
};

/**
 * struct acrn_emu_value_call - an ACRN ioctl whose argument is a value, by pointer
 * @cmd:	the ACRN ioctl: ACRN_IOCTL_SET_IRQLINE, or 0x4004A2A1
 *		(SETUP_VM_EVENT_FD of ACRN's own kernel) (in)
 * @reserved:	zero (in)
 * @arg:	its argument value, e.g. the packed struct acrn_irqline_ops; an fd
 *		number names a file of the process making this call (in)
 * @result:	what that ioctl gave on this open file: >= 0, or -errno (out)
 *
 * FUSE restricted ioctls take the argument of an _IOW command for an address
 * and copy _IOC_SIZE bytes from it, so SET_IRQLINE, whose argument is the
 * value itself, fails with EFAULT before the node sees it. This ioctl makes
 * the same call on the same open file (the same VM): the ioctl itself
 * returns 0 and @result holds the carried call's answer; the ioctl fails
 * only for its own reasons (EFAULT, EINVAL: nonzero @reserved or another
 * @cmd).
 */
struct acrn_emu_value_call {
	__u32	cmd;
	__u32	reserved;
	__u64	arg;
	__s64	result;
};

#define ACRN_EMU_IOCTL_VERSION \
	_IOR(ACRN_EMU_IOCTL_TYPE, 0x00, struct acrn_emu_version)
#define ACRN_EMU_IOCTL_BIND_VM \
	_IOWR(ACRN_EMU_IOCTL_TYPE, 0x01, struct acrn_emu_bind)
#define ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT \
	_IOW(ACRN_EMU_IOCTL_TYPE, 0x02, struct acrn_emu_range_client)
#define ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT \
	_IO(ACRN_EMU_IOCTL_TYPE, 0x03)
#define ACRN_EMU_IOCTL_ADD_RANGE \
	_IOW(ACRN_EMU_IOCTL_TYPE, 0x04, struct acrn_emu_range)
#define ACRN_EMU_IOCTL_DEL_RANGE \
	_IOW(ACRN_EMU_IOCTL_TYPE, 0x05, struct acrn_emu_range)
#define ACRN_EMU_IOCTL_VALUE_CALL \
	_IOWR(ACRN_EMU_IOCTL_TYPE, 0x06, struct acrn_emu_value_call)

#endif /* _ACRN_HSM_EMU_H */
