/* The acrn-kernel profile's numbers and sizes as acrn-dm's own headers give them
 * (tests/test_acrn_kernel_abi.py builds this with -I <acrn-hypervisor>/devicemodel/include).
 * Prints: SETUP_ASYNCIO SETUP_VM_EVENT_RING SETUP_VM_EVENT_FD ASSIGN_PIO_REGION
 *         sizeof(acrn_asyncio_info) sizeof(shared_buf) sizeof(vm_event) */
#include <stdio.h>
#include <stdint.h>
#include <stdbool.h>
#include <sys/ioctl.h>
#include <linux/types.h>
#include "acrn_common.h"
#include "hsm_ioctl_defs.h"

int main(void)
{
    printf("%lu %lu %lu %lu %lu %lu %lu\n",
           (unsigned long)ACRN_IOCTL_SETUP_ASYNCIO, (unsigned long)ACRN_IOCTL_SETUP_VM_EVENT_RING,
           (unsigned long)ACRN_IOCTL_SETUP_VM_EVENT_FD, (unsigned long)ACRN_IOCTL_ASSIGN_PIO_REGION,
           (unsigned long)sizeof(struct acrn_asyncio_info), (unsigned long)sizeof(struct shared_buf),
           (unsigned long)sizeof(struct vm_event));
    return 0;
}
