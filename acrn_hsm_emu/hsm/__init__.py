"""The HSM: what drivers/virt/acrn does, as a cdev device."""
