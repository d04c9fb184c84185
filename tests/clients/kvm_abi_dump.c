/*
 * kvm_abi_dump: what <linux/kvm.h> says, for tests/test_kvm_abi.py to compare
 * with acrn_hsm_emu/hypervisor/backends/kvm_abi.py.
 *
 * Prints "name value" lines: ioctl numbers, capability and exit-reason
 * constants, struct sizes (sizeof.X) and field offsets (offsetof.X.f).
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#define V(x) printf("%s %llu\n", #x, (unsigned long long)(x))
#define S(t) printf("sizeof.%s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("offsetof.%s.%s %zu\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	V(KVMIO); V(KVM_API_VERSION);
	V(KVM_GET_API_VERSION); V(KVM_CREATE_VM); V(KVM_GET_MSR_INDEX_LIST);
	V(KVM_CHECK_EXTENSION); V(KVM_GET_VCPU_MMAP_SIZE); V(KVM_GET_SUPPORTED_CPUID);
	V(KVM_CREATE_VCPU); V(KVM_SET_USER_MEMORY_REGION); V(KVM_SET_TSS_ADDR);
	V(KVM_SET_IDENTITY_MAP_ADDR); V(KVM_CREATE_IRQCHIP); V(KVM_IRQ_LINE);
	V(KVM_GET_IRQCHIP); V(KVM_SET_IRQCHIP); V(KVM_SET_GSI_ROUTING); V(KVM_SIGNAL_MSI);
	V(KVM_SET_BOOT_CPU_ID);
	V(KVM_RUN); V(KVM_GET_REGS); V(KVM_SET_REGS); V(KVM_GET_SREGS); V(KVM_SET_SREGS);
	V(KVM_GET_MSRS); V(KVM_SET_MSRS); V(KVM_SET_SIGNAL_MASK); V(KVM_GET_FPU);
	V(KVM_SET_FPU); V(KVM_GET_LAPIC); V(KVM_SET_LAPIC); V(KVM_SET_CPUID2);
	V(KVM_GET_MP_STATE); V(KVM_SET_MP_STATE); V(KVM_GET_VCPU_EVENTS);
	V(KVM_SET_VCPU_EVENTS); V(KVM_GET_DEBUGREGS); V(KVM_SET_DEBUGREGS);
	V(KVM_GET_XCRS); V(KVM_SET_XCRS);

	V(KVM_CAP_IRQCHIP); V(KVM_CAP_USER_MEMORY); V(KVM_CAP_SET_TSS_ADDR);
	V(KVM_CAP_EXT_CPUID); V(KVM_CAP_NR_MEMSLOTS); V(KVM_CAP_MP_STATE);
	V(KVM_CAP_IRQ_ROUTING); V(KVM_CAP_SET_IDENTITY_MAP_ADDR); V(KVM_CAP_XCRS);
	V(KVM_CAP_SIGNAL_MSI); V(KVM_CAP_READONLY_MEM); V(KVM_CAP_IMMEDIATE_EXIT);
	V(KVM_CAP_SET_BOOT_CPU_ID); V(KVM_CAP_MAX_VCPU_ID);

	V(KVM_EXIT_UNKNOWN); V(KVM_EXIT_EXCEPTION); V(KVM_EXIT_IO); V(KVM_EXIT_HYPERCALL);
	V(KVM_EXIT_DEBUG); V(KVM_EXIT_HLT); V(KVM_EXIT_MMIO); V(KVM_EXIT_IRQ_WINDOW_OPEN);
	V(KVM_EXIT_SHUTDOWN); V(KVM_EXIT_FAIL_ENTRY); V(KVM_EXIT_INTR);
	V(KVM_EXIT_INTERNAL_ERROR); V(KVM_EXIT_SYSTEM_EVENT);
	V(KVM_EXIT_IO_IN); V(KVM_EXIT_IO_OUT); V(KVM_MEM_READONLY);
	V(KVM_IRQ_ROUTING_IRQCHIP); V(KVM_IRQCHIP_PIC_MASTER); V(KVM_IRQCHIP_PIC_SLAVE);
	V(KVM_IRQCHIP_IOAPIC); V(KVM_IOAPIC_NUM_PINS);
	V(KVM_MP_STATE_RUNNABLE); V(KVM_MP_STATE_UNINITIALIZED);

	S(kvm_regs); S(kvm_segment); S(kvm_dtable); S(kvm_sregs);
	S(kvm_userspace_memory_region); S(kvm_cpuid_entry2); S(kvm_msi); S(kvm_irq_level);
	S(kvm_irq_routing_entry); S(kvm_msr_entry); S(kvm_fpu); S(kvm_lapic_state);
	S(kvm_xcrs); S(kvm_vcpu_events); S(kvm_debugregs); S(kvm_mp_state); S(kvm_irqchip);
	S(kvm_cpuid2); S(kvm_msrs); S(kvm_msr_list); S(kvm_irq_routing); S(kvm_signal_mask);

	O(kvm_regs, rax); O(kvm_regs, rbx); O(kvm_regs, rcx); O(kvm_regs, rdx);
	O(kvm_regs, rsi); O(kvm_regs, rdi); O(kvm_regs, rsp); O(kvm_regs, rbp);
	O(kvm_regs, r8); O(kvm_regs, r15); O(kvm_regs, rip); O(kvm_regs, rflags);
	O(kvm_segment, base); O(kvm_segment, limit); O(kvm_segment, selector);
	O(kvm_segment, type); O(kvm_segment, present); O(kvm_segment, dpl);
	O(kvm_segment, db); O(kvm_segment, s); O(kvm_segment, l); O(kvm_segment, g);
	O(kvm_segment, avl); O(kvm_segment, unusable);
	O(kvm_dtable, base); O(kvm_dtable, limit);
	O(kvm_sregs, cs); O(kvm_sregs, ds); O(kvm_sregs, es); O(kvm_sregs, fs);
	O(kvm_sregs, gs); O(kvm_sregs, ss); O(kvm_sregs, tr); O(kvm_sregs, ldt);
	O(kvm_sregs, gdt); O(kvm_sregs, idt); O(kvm_sregs, cr0); O(kvm_sregs, cr2);
	O(kvm_sregs, cr3); O(kvm_sregs, cr4); O(kvm_sregs, cr8); O(kvm_sregs, efer);
	O(kvm_sregs, apic_base); O(kvm_sregs, interrupt_bitmap);
	O(kvm_userspace_memory_region, slot); O(kvm_userspace_memory_region, flags);
	O(kvm_userspace_memory_region, guest_phys_addr);
	O(kvm_userspace_memory_region, memory_size);
	O(kvm_userspace_memory_region, userspace_addr);
	O(kvm_cpuid_entry2, function); O(kvm_cpuid_entry2, index); O(kvm_cpuid_entry2, flags);
	O(kvm_cpuid_entry2, eax); O(kvm_cpuid_entry2, ebx); O(kvm_cpuid_entry2, ecx);
	O(kvm_cpuid_entry2, edx);
	O(kvm_msi, address_lo); O(kvm_msi, address_hi); O(kvm_msi, data); O(kvm_msi, flags);
	O(kvm_msi, devid);
	O(kvm_irq_level, irq); O(kvm_irq_level, level);
	O(kvm_irq_routing_entry, gsi); O(kvm_irq_routing_entry, type);
	O(kvm_irq_routing_entry, flags); O(kvm_irq_routing_entry, u.irqchip.irqchip);
	O(kvm_irq_routing_entry, u.irqchip.pin);
	O(kvm_msr_entry, index); O(kvm_msr_entry, data);

	O(kvm_run, immediate_exit); O(kvm_run, exit_reason); O(kvm_run, io.direction);
	O(kvm_run, io.size); O(kvm_run, io.port); O(kvm_run, io.count);
	O(kvm_run, io.data_offset); O(kvm_run, mmio.phys_addr); O(kvm_run, mmio.data);
	O(kvm_run, mmio.len); O(kvm_run, mmio.is_write); O(kvm_run, internal.suberror);
	O(kvm_run, system_event.type); O(kvm_run, fail_entry.hardware_entry_failure_reason);
	return 0;
}
