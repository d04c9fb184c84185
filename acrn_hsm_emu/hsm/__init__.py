"""The HSM: what drivers/virt/acrn does, as a cdev device."""

from acrn_hsm_emu.hsm.device import HsmDevice, HsmFile

__all__ = ["HsmDevice", "HsmFile"]
