"""The HSM: what drivers/virt/acrn does, as a cdev device."""

from acrn_hsm_emu.hsm.acrn_drv import HsmFile
from acrn_hsm_emu.hsm.hsm import HsmDevice

__all__ = ["HsmDevice", "HsmFile"]
