"""The /dev/eduN interface for programs (mirrors ``edu_uapi.h`` next to this file).

write(fd, &n, 4); read(fd, &result, 4);        /* n! mod 2**32 */
struct edu_dma d = { .buf = (uintptr_t)p, .len = 100, .offset = 0 };
ioctl(fd, EDU_IOC_DMA_TO_DEVICE, &d);          /* p[0..99] -> device buffer */
ioctl(fd, EDU_IOC_DMA_FROM_DEVICE, &d);        /* device buffer -> p[0..99] */
ioctl(fd, EDU_IOC_LIVENESS, &v);               /* v becomes ~v, checked by the device */
"""

from __future__ import annotations

import struct

from udrv.kernel.ioctl import _IOW, _IOWR

EDU_IOC_MAGIC = "E"
#: struct edu_dma { __u64 buf; __u32 len; __u32 offset; }: buf is a user pointer.
edu_dma = struct.Struct("<QII")
EDU_IOC_DMA_TO_DEVICE = _IOW(EDU_IOC_MAGIC, 1, edu_dma.size)
EDU_IOC_DMA_FROM_DEVICE = _IOW(EDU_IOC_MAGIC, 2, edu_dma.size)
EDU_IOC_LIVENESS = _IOWR(EDU_IOC_MAGIC, 3, 4)
