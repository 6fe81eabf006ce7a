/* /dev/eduN, served by `udrv edu serve` (udrv/drivers/edu/cuse.py). */
#ifndef UDRV_EDU_UAPI_H
#define UDRV_EDU_UAPI_H
#include <linux/ioctl.h>
#include <linux/types.h>

/* write(fd, &n, 4) then read(fd, &result, 4): result = n! mod 2^32, computed by the device. */

struct edu_dma {
	__u64 buf;    /* user buffer */
	__u32 len;    /* 1..4095 bytes: offset + len <= 4095 (QEMU edu quirk) */
	__u32 offset; /* in the device's 4 KiB buffer */
};

#define EDU_IOC_MAGIC 'E'
#define EDU_IOC_DMA_TO_DEVICE   _IOW(EDU_IOC_MAGIC, 1, struct edu_dma)
#define EDU_IOC_DMA_FROM_DEVICE _IOW(EDU_IOC_MAGIC, 2, struct edu_dma)
#define EDU_IOC_LIVENESS        _IOWR(EDU_IOC_MAGIC, 3, __u32)

#endif
