"""acrn-hsm-emu: userspace emulation of the ACRN Hypervisor Service Module."""
