/*
 * abi_dump: print the binary interface of the system <linux/acrn.h>.
 *
 * One fact per line, for tests/test_abi.py to compare with acrn_hsm_emu/abi.py:
 *
 *   sizeof  <struct> <bytes>
 *   alignof <struct> <bytes>
 *   field   <struct>.<path> <offset> <size> <kind>
 *   const   <NAME> <value, decimal>
 *   ioctl   <NAME> <number, 0x%08x>
 *
 * <path> is dotted for nested members and uses [i] for every element of an
 * array of structures; <offset> is from the start of the outermost struct.
 * Members of anonymous unions appear directly under their parent, as C
 * names them. <kind>: "u"/"s" integer scalar (unsigned/signed), "a<N>u" /
 * "a<N>s" integer array of N elements, "r" struct or union, "ar<N>" array of
 * N structs. Everything is measured by the compiler from the real header;
 * nothing here repeats a number by hand.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>	/* _IOW & co.: <linux/acrn.h> uses them without including them */
#include <linux/acrn.h>

#define SIGNED(x) ((__typeof__(x))-1 < (__typeof__(x))1)
#define MEMBER(S, m) (((S *)0)->m)

static void emit(const char *pre, const char *name, size_t off, size_t size, const char *kind)
{
	printf("field %s.%s %zu %zu %s\n", pre, name, off, size, kind);
}

static void emit_array(const char *pre, const char *name, size_t off, size_t size,
		       size_t count, int is_signed)
{
	printf("field %s.%s %zu %zu a%zu%s\n", pre, name, off, size, count,
	       is_signed ? "s" : "u");
}

static void emit_record_array(const char *pre, const char *name, size_t off, size_t size,
			      size_t count)
{
	printf("field %s.%s %zu %zu ar%zu\n", pre, name, off, size, count);
}

/* These macros expect `S` (the struct type), `pre` and `base` in scope. */
#define INT(m) \
	emit(pre, #m, base + offsetof(S, m), sizeof(MEMBER(S, m)), \
	     SIGNED(MEMBER(S, m)) ? "s" : "u")
#define ARR(m) \
	emit_array(pre, #m, base + offsetof(S, m), sizeof(MEMBER(S, m)), \
		   sizeof(MEMBER(S, m)) / sizeof(MEMBER(S, m)[0]), SIGNED(MEMBER(S, m)[0]))
#define REC(m, fn) do { \
	char sub_[256]; \
	emit(pre, #m, base + offsetof(S, m), sizeof(MEMBER(S, m)), "r"); \
	if (snprintf(sub_, sizeof(sub_), "%s.%s", pre, #m) >= (int)sizeof(sub_)) \
		abort(); \
	fn(sub_, base + offsetof(S, m)); \
} while (0)
#define RECARR(m, fn) do { \
	char sub_[256]; \
	size_t n_ = sizeof(MEMBER(S, m)) / sizeof(MEMBER(S, m)[0]); \
	emit_record_array(pre, #m, base + offsetof(S, m), sizeof(MEMBER(S, m)), n_); \
	for (size_t i_ = 0; i_ < n_; i_++) { \
		if (snprintf(sub_, sizeof(sub_), "%s.%s[%zu]", pre, #m, i_) >= (int)sizeof(sub_)) \
			abort(); \
		fn(sub_, base + offsetof(S, m) + i_ * sizeof(MEMBER(S, m)[0])); \
	} \
} while (0)

static void d_mmio_request(const char *pre, size_t base)
{
	typedef struct acrn_mmio_request S;
	INT(direction); INT(reserved); INT(address); INT(size); INT(value);
}

static void d_pio_request(const char *pre, size_t base)
{
	typedef struct acrn_pio_request S;
	INT(direction); INT(reserved); INT(address); INT(size); INT(value);
}

static void d_pci_request(const char *pre, size_t base)
{
	typedef struct acrn_pci_request S;
	INT(direction); ARR(reserved); INT(size); INT(value);
	INT(bus); INT(dev); INT(func); INT(reg);
}

static void d_io_request_reqs(const char *pre, size_t base)
{
	typedef __typeof__(MEMBER(struct acrn_io_request, reqs)) S;
	REC(pio_request, d_pio_request);
	REC(pci_request, d_pci_request);
	REC(mmio_request, d_mmio_request);
	ARR(data);
}

static void d_io_request(const char *pre, size_t base)
{
	typedef struct acrn_io_request S;
	INT(type); INT(completion_polling); ARR(reserved0);
	REC(reqs, d_io_request_reqs);
	INT(reserved1); INT(kernel_handled); INT(processed);
}

static void d_io_request_buffer(const char *pre, size_t base)
{
	typedef struct acrn_io_request_buffer S;
	RECARR(req_slot, d_io_request);
	ARR(reserved);
}

static void d_ioreq_notify(const char *pre, size_t base)
{
	typedef struct acrn_ioreq_notify S;
	INT(vmid); INT(reserved); INT(vcpu);
}

static void d_vm_creation(const char *pre, size_t base)
{
	typedef struct acrn_vm_creation S;
	INT(vmid); INT(reserved0); INT(vcpu_num); INT(reserved1);
	/*
	 * 6.1 declares `guid_t uuid` (a struct holding __u8 b[16]); newer
	 * headers declare `__u8 uuid[16]`. Same bytes; report it as the byte
	 * array both really are. (This line needs the guid_t variant.)
	 */
	emit_array(pre, "uuid", base + offsetof(S, uuid), sizeof(MEMBER(S, uuid)),
		   sizeof(MEMBER(S, uuid.b)) / sizeof(MEMBER(S, uuid.b[0])),
		   SIGNED(MEMBER(S, uuid.b[0])));
	INT(vm_flag); INT(ioreq_buf); INT(cpu_affinity);
}

static void d_gp_regs(const char *pre, size_t base)
{
	typedef struct acrn_gp_regs S;
	INT(rax); INT(rcx); INT(rdx); INT(rbx); INT(rsp); INT(rbp); INT(rsi); INT(rdi);
	INT(r8); INT(r9); INT(r10); INT(r11); INT(r12); INT(r13); INT(r14); INT(r15);
}

static void d_descriptor_ptr(const char *pre, size_t base)
{
	typedef struct acrn_descriptor_ptr S;
	INT(limit); INT(base); ARR(reserved);
}

static void d_regs(const char *pre, size_t base)
{
	typedef struct acrn_regs S;
	REC(gprs, d_gp_regs);
	REC(gdt, d_descriptor_ptr);
	REC(idt, d_descriptor_ptr);
	INT(rip); INT(cs_base); INT(cr0); INT(cr4); INT(cr3); INT(ia32_efer); INT(rflags);
	ARR(reserved_64);
	INT(cs_ar); INT(cs_limit); ARR(reserved_32);
	INT(cs_sel); INT(ss_sel); INT(ds_sel); INT(es_sel);
	INT(fs_sel); INT(gs_sel); INT(ldt_sel); INT(tr_sel);
}

static void d_vcpu_regs(const char *pre, size_t base)
{
	typedef struct acrn_vcpu_regs S;
	INT(vcpu_id); ARR(reserved);
	REC(vcpu_regs, d_regs);
}

static void d_vm_memmap(const char *pre, size_t base)
{
	typedef struct acrn_vm_memmap S;
	INT(type); INT(attr); INT(user_vm_pa);
	INT(service_vm_pa); INT(vma_base);	/* anonymous union */
	INT(len);
}

static void d_ptdev_irq_intx(const char *pre, size_t base)
{
	typedef __typeof__(MEMBER(struct acrn_ptdev_irq, intx)) S;
	INT(virt_pin); INT(phys_pin); INT(is_pic_pin);
}

static void d_ptdev_irq(const char *pre, size_t base)
{
	typedef struct acrn_ptdev_irq S;
	INT(type); INT(virt_bdf); INT(phys_bdf);
	REC(intx, d_ptdev_irq_intx);
}

static void d_pcidev(const char *pre, size_t base)
{
	typedef struct acrn_pcidev S;
	INT(type); INT(virt_bdf); INT(phys_bdf); INT(intr_line); INT(intr_pin);
	ARR(bar);
}

static void d_mmiodev_res(const char *pre, size_t base)
{
	typedef __typeof__(MEMBER(struct acrn_mmiodev, res[0])) S;
	INT(user_vm_pa); INT(service_vm_pa); INT(size); INT(mem_type);
}

static void d_mmiodev(const char *pre, size_t base)
{
	typedef struct acrn_mmiodev S;
	ARR(name);
	RECARR(res, d_mmiodev_res);
}

static void d_vdev_id_fields(const char *pre, size_t base)
{
	typedef __typeof__(MEMBER(struct acrn_vdev, id.fields)) S;
	INT(vendor); INT(device); INT(legacy_id);
}

static void d_vdev_id(const char *pre, size_t base)
{
	typedef __typeof__(MEMBER(struct acrn_vdev, id)) S;
	INT(value);
	REC(fields, d_vdev_id_fields);
}

static void d_vdev(const char *pre, size_t base)
{
	typedef struct acrn_vdev S;
	REC(id, d_vdev_id);
	INT(slot); ARR(io_addr); ARR(io_size); ARR(args);
}

static void d_msi_entry(const char *pre, size_t base)
{
	typedef struct acrn_msi_entry S;
	INT(msi_addr); INT(msi_data);
}

static void d_acpi_generic_address(const char *pre, size_t base)
{
	typedef struct acrn_acpi_generic_address S;
	INT(space_id); INT(bit_width); INT(bit_offset); INT(access_size); INT(address);
}

static void d_cstate_data(const char *pre, size_t base)
{
	typedef struct acrn_cstate_data S;
	REC(cx_reg, d_acpi_generic_address);
	INT(type); INT(latency); INT(power);
}

static void d_pstate_data(const char *pre, size_t base)
{
	typedef struct acrn_pstate_data S;
	INT(core_frequency); INT(power); INT(transition_latency);
	INT(bus_master_latency); INT(control); INT(status);
}

static void d_ioeventfd(const char *pre, size_t base)
{
	typedef struct acrn_ioeventfd S;
	INT(fd); INT(flags); INT(addr); INT(len); INT(reserved); INT(data);
}

static void d_irqfd(const char *pre, size_t base)
{
	typedef struct acrn_irqfd S;
	INT(fd); INT(flags);
	REC(msi, d_msi_entry);
}

#define STRUCT(name, fn) do { \
	printf("sizeof %s %zu\n", #name, sizeof(struct name)); \
	printf("alignof %s %zu\n", #name, _Alignof(struct name)); \
	fn(#name, 0); \
} while (0)

#define CONST(x) printf("const %s %llu\n", #x, (unsigned long long)(x))
#define IOCTL(x) printf("ioctl %s 0x%08lx\n", #x, (unsigned long)(x))

int main(void)
{
	STRUCT(acrn_mmio_request, d_mmio_request);
	STRUCT(acrn_pio_request, d_pio_request);
	STRUCT(acrn_pci_request, d_pci_request);
	STRUCT(acrn_io_request, d_io_request);
	STRUCT(acrn_io_request_buffer, d_io_request_buffer);
	STRUCT(acrn_ioreq_notify, d_ioreq_notify);
	STRUCT(acrn_vm_creation, d_vm_creation);
	STRUCT(acrn_gp_regs, d_gp_regs);
	STRUCT(acrn_descriptor_ptr, d_descriptor_ptr);
	STRUCT(acrn_regs, d_regs);
	STRUCT(acrn_vcpu_regs, d_vcpu_regs);
	STRUCT(acrn_vm_memmap, d_vm_memmap);
	STRUCT(acrn_ptdev_irq, d_ptdev_irq);
	STRUCT(acrn_pcidev, d_pcidev);
	STRUCT(acrn_mmiodev, d_mmiodev);
	STRUCT(acrn_vdev, d_vdev);
	STRUCT(acrn_msi_entry, d_msi_entry);
	STRUCT(acrn_acpi_generic_address, d_acpi_generic_address);
	STRUCT(acrn_cstate_data, d_cstate_data);
	STRUCT(acrn_pstate_data, d_pstate_data);
	STRUCT(acrn_ioeventfd, d_ioeventfd);
	STRUCT(acrn_irqfd, d_irqfd);

	CONST(ACRN_IO_REQUEST_MAX);
	CONST(ACRN_IOREQ_STATE_PENDING);
	CONST(ACRN_IOREQ_STATE_COMPLETE);
	CONST(ACRN_IOREQ_STATE_PROCESSING);
	CONST(ACRN_IOREQ_STATE_FREE);
	CONST(ACRN_IOREQ_TYPE_PORTIO);
	CONST(ACRN_IOREQ_TYPE_MMIO);
	CONST(ACRN_IOREQ_TYPE_PCICFG);
	CONST(ACRN_IOREQ_DIR_READ);
	CONST(ACRN_IOREQ_DIR_WRITE);
	CONST(ACRN_MEM_ACCESS_RIGHT_MASK);
	CONST(ACRN_MEM_ACCESS_READ);
	CONST(ACRN_MEM_ACCESS_WRITE);
	CONST(ACRN_MEM_ACCESS_EXEC);
	CONST(ACRN_MEM_ACCESS_RWX);
	CONST(ACRN_MEM_TYPE_MASK);
	CONST(ACRN_MEM_TYPE_WB);
	CONST(ACRN_MEM_TYPE_WT);
	CONST(ACRN_MEM_TYPE_UC);
	CONST(ACRN_MEM_TYPE_WC);
	CONST(ACRN_MEM_TYPE_WP);
	CONST(ACRN_MEMMAP_RAM);
	CONST(ACRN_MEMMAP_MMIO);
	CONST(ACRN_PTDEV_IRQ_INTX);
	CONST(ACRN_PTDEV_IRQ_MSI);
	CONST(ACRN_PTDEV_IRQ_MSIX);
	CONST(ACRN_PTDEV_QUIRK_ASSIGN);
	CONST(ACRN_MMIODEV_RES_NUM);
	CONST(ACRN_PCI_NUM_BARS);
	CONST(PMCMD_TYPE_MASK);
	CONST(ACRN_PMCMD_GET_PX_CNT);
	CONST(ACRN_PMCMD_GET_PX_DATA);
	CONST(ACRN_PMCMD_GET_CX_CNT);
	CONST(ACRN_PMCMD_GET_CX_DATA);
	CONST(ACRN_IOEVENTFD_FLAG_PIO);
	CONST(ACRN_IOEVENTFD_FLAG_DATAMATCH);
	CONST(ACRN_IOEVENTFD_FLAG_DEASSIGN);
	CONST(ACRN_IRQFD_FLAG_DEASSIGN);
	CONST(ACRN_IOCTL_TYPE);

	IOCTL(ACRN_IOCTL_CREATE_VM);
	IOCTL(ACRN_IOCTL_DESTROY_VM);
	IOCTL(ACRN_IOCTL_START_VM);
	IOCTL(ACRN_IOCTL_PAUSE_VM);
	IOCTL(ACRN_IOCTL_RESET_VM);
	IOCTL(ACRN_IOCTL_SET_VCPU_REGS);
	IOCTL(ACRN_IOCTL_INJECT_MSI);
	IOCTL(ACRN_IOCTL_VM_INTR_MONITOR);
	IOCTL(ACRN_IOCTL_SET_IRQLINE);
	IOCTL(ACRN_IOCTL_NOTIFY_REQUEST_FINISH);
	IOCTL(ACRN_IOCTL_CREATE_IOREQ_CLIENT);
	IOCTL(ACRN_IOCTL_ATTACH_IOREQ_CLIENT);
	IOCTL(ACRN_IOCTL_DESTROY_IOREQ_CLIENT);
	IOCTL(ACRN_IOCTL_CLEAR_VM_IOREQ);
	IOCTL(ACRN_IOCTL_SET_MEMSEG);
	IOCTL(ACRN_IOCTL_UNSET_MEMSEG);
	IOCTL(ACRN_IOCTL_SET_PTDEV_INTR);
	IOCTL(ACRN_IOCTL_RESET_PTDEV_INTR);
	IOCTL(ACRN_IOCTL_ASSIGN_PCIDEV);
	IOCTL(ACRN_IOCTL_DEASSIGN_PCIDEV);
	IOCTL(ACRN_IOCTL_ASSIGN_MMIODEV);
	IOCTL(ACRN_IOCTL_DEASSIGN_MMIODEV);
	IOCTL(ACRN_IOCTL_CREATE_VDEV);
	IOCTL(ACRN_IOCTL_DESTROY_VDEV);
	IOCTL(ACRN_IOCTL_PM_GET_CPU_STATE);
	IOCTL(ACRN_IOCTL_IOEVENTFD);
	IOCTL(ACRN_IOCTL_IRQFD);

	return fflush(stdout) == 0 ? 0 : 1;
}
