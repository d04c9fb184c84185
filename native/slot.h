/* A request slot: struct acrn_io_request's fields (reqs.{pio,mmio}_request's
   for direction .. value) and states, checked against acrn_hsm_emu.abi by the
   tests (tests/test_abi.py). */
#ifndef HSM_SLOT_H
#define HSM_SLOT_H

#define HSM_SLOT_POLLING 4
#define HSM_SLOT_DIRECTION 64
#define HSM_SLOT_ADDRESS 72
#define HSM_SLOT_SIZE 80
#define HSM_SLOT_VALUE 88
#define HSM_SLOT_KH 132
#define HSM_SLOT_STATE 136
#define HSM_STATE_PENDING 0
#define HSM_STATE_COMPLETE 1
#define HSM_STATE_FREE 3

/* The private request a vCPU fills before posting it: type .. end of reqs. */
#define HSM_HEAD_LEN 128

#endif
