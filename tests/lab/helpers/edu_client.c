/* An ordinary program using /dev/eduN: factorial by write/read, DMA by ioctl. No udrv. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "edu_uapi.h"

int main(int argc, char **argv)
{
	int fd = open(argc > 1 ? argv[1] : "/dev/edu0", O_RDWR);
	if (fd < 0) { perror("open"); return 2; }
	uint32_t n = 12, r = 0;
	if (write(fd, &n, 4) != 4 || read(fd, &r, 4) != 4) { perror("factorial"); return 3; }
	printf("factorial %u %u\n", n, r);
	char out[1000], in[1000];
	for (int i = 0; i < 1000; i++) out[i] = (char)(i * 7);
	struct edu_dma d = { .buf = (uintptr_t)out, .len = sizeof(out), .offset = 100 };
	if (ioctl(fd, EDU_IOC_DMA_TO_DEVICE, &d)) { perror("dma to"); return 4; }
	memset(in, 0, sizeof(in));
	d.buf = (uintptr_t)in;
	if (ioctl(fd, EDU_IOC_DMA_FROM_DEVICE, &d)) { perror("dma from"); return 5; }
	printf("dma %s\n", memcmp(in, out, sizeof(in)) ? "mismatch" : "ok");
	d.len = 5000;
	printf("oversize %s\n", ioctl(fd, EDU_IOC_DMA_TO_DEVICE, &d) ? "rejected" : "accepted");
	uint32_t v = 0x0f0f0f0f;
	int rc = ioctl(fd, EDU_IOC_LIVENESS, &v);
	printf("liveness %s %08x\n", rc ? "failed" : "ok", v);
	return 0;
}
