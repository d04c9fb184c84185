/* acrn_hsm_emu._native: what the cffi module binds (its preamble is this file;
   the declarations Python sees are _cffi_src/native_decl.h). The Linux calls
   Python lacks, the vCPU request cycle, the express path, the KVM loop. */
#include <sys/uio.h>  /* process_vm_readv/writev, bound as they are */

#include "remote_memory.h"
#include "pidfd.h"
#include "slot.h"
#include "vcpu_cycle.h"
#include "express.h"
#include "kvm_run.h"
#include "irq_gate.h"
