/*
 * ext_abi_dump: every struct size, field offset/size, constant and ioctl
 * number of acrn_hsm_emu.h as the C compiler sees them, one per line:
 *   sizeof NAME N | field STRUCT.FIELD OFFSET SIZE | const NAME VALUE | ioctl NAME VALUE
 * tests/test_ext_abi.py compares them with acrn_hsm_emu.client.extension.
 */
#include <stddef.h>
#include <stdio.h>
#include <acrn_hsm_emu.h>

#define SIZE(s) printf("sizeof %s %zu\n", #s, sizeof(struct s))
#define FIELD(s, f) printf("field %s.%s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f))
#define CONST(c) printf("const %s %llu\n", #c, (unsigned long long)(c))
#define IOCTL(c) printf("ioctl %s %llu\n", #c, (unsigned long long)(c))

int main(void)
{
	SIZE(acrn_emu_version);
	FIELD(acrn_emu_version, major);
	FIELD(acrn_emu_version, minor);
	FIELD(acrn_emu_version, features);
	FIELD(acrn_emu_version, reserved);
	SIZE(acrn_emu_bind);
	FIELD(acrn_emu_bind, vmid);
	FIELD(acrn_emu_bind, vcpu_num);
	FIELD(acrn_emu_bind, flags);
	FIELD(acrn_emu_bind, owner_uid);
	FIELD(acrn_emu_bind, reserved);
	SIZE(acrn_emu_range_client);
	FIELD(acrn_emu_range_client, name);
	FIELD(acrn_emu_range_client, ioreq_buf);
	FIELD(acrn_emu_range_client, flags);
	FIELD(acrn_emu_range_client, reserved);
	SIZE(acrn_emu_range);
	FIELD(acrn_emu_range, type);
	FIELD(acrn_emu_range, reserved);
	FIELD(acrn_emu_range, start);
	FIELD(acrn_emu_range, end);
	SIZE(acrn_emu_value_call);
	FIELD(acrn_emu_value_call, cmd);
	FIELD(acrn_emu_value_call, reserved);
	FIELD(acrn_emu_value_call, arg);
	FIELD(acrn_emu_value_call, result);
	CONST(ACRN_EMU_IOCTL_TYPE);
	CONST(ACRN_EMU_ABI_MAJOR);
	CONST(ACRN_EMU_ABI_MINOR);
	CONST(ACRN_EMU_FEATURE_BIND);
	CONST(ACRN_EMU_FEATURE_RANGE_CLIENT);
	CONST(ACRN_EMU_FEATURE_PCI_RANGES);
	CONST(ACRN_EMU_FEATURE_VALUE_CALL);
	CONST(ACRN_EMU_RANGE_PIO);
	CONST(ACRN_EMU_RANGE_MMIO);
	CONST(ACRN_EMU_RANGE_PCI);
	CONST(ACRN_EMU_NAME_LEN);
	CONST(ACRN_EMU_MAX_RANGES);
	CONST(ACRN_EMU_PCI_BDF(0xab, 0x1f, 7));
	IOCTL(ACRN_EMU_IOCTL_VERSION);
	IOCTL(ACRN_EMU_IOCTL_BIND_VM);
	IOCTL(ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT);
	IOCTL(ACRN_EMU_IOCTL_DESTROY_RANGE_CLIENT);
	IOCTL(ACRN_EMU_IOCTL_ADD_RANGE);
	IOCTL(ACRN_EMU_IOCTL_DEL_RANGE);
	IOCTL(ACRN_EMU_IOCTL_VALUE_CALL);
	return 0;
}
