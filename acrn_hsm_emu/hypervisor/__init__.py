"""The mock ACRN hypervisor: VMs, vCPUs, hypercalls, upcalls."""
