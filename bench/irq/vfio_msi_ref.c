/*
 * The C reference for bench/irq: the VFIO MSI round trip on QEMU edu, with nothing in the
 * way. Opens the device through the VFIO container/group API, enables MSI with one
 * eventfd (VFIO_DEVICE_SET_IRQS), sets Bus Master Enable, then N times:
 *   t0 = now; write INTR_RAISE (BAR0 + 0x60); read(eventfd) (blocking); t1 = now;
 *   write INTR_ACK (BAR0 + 0x64)
 * and prints t1 - t0 in nanoseconds.
 *
 * usage: vfio_msi_ref 0000:00:04.0
 * It then serves blocks, so that bench/irq can interleave it with the other variants while it
 * keeps its device open: for each line "N" on stdin it runs N rounds and writes one line to
 * stdout: how often it slept during them (voluntary context switches, getrusage), then the N
 * samples, space-separated; it ends at end of input.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define EDU_INTR_RAISE 0x60 /* docs/specs/edu.rst */
#define EDU_INTR_ACK 0x64
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MASTER 0x4

static void die(const char *what)
{
	fprintf(stderr, "vfio_msi_ref: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s PCI-ADDRESS (then one line per block: ROUNDS)\n", argv[0]);
		return 2;
	}
	const char *addr = argv[1];
	long rounds;
	char path[256], link[256];

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", addr);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		die("readlink iommu_group");
	link[n] = 0;
	const char *group_id = strrchr(link, '/') + 1;

	int container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0)
		die("open /dev/vfio/vfio");
	snprintf(path, sizeof(path), "/dev/vfio/%s", group_id);
	int group = open(path, O_RDWR);
	if (group < 0)
		die("open group");
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
		die("VFIO_SET_IOMMU");
	int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, addr);
	if (device < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");

	struct vfio_region_info bar0 = { .argsz = sizeof(bar0), .index = VFIO_PCI_BAR0_REGION_INDEX };
	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &bar0) ||
	    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg))
		die("VFIO_DEVICE_GET_REGION_INFO");
	volatile uint32_t *regs = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED,
				       device, (off_t)bar0.offset);
	if (regs == MAP_FAILED)
		die("mmap BAR0");

	int efd = eventfd(0, EFD_CLOEXEC);
	if (efd < 0)
		die("eventfd");
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
	set->argsz = sizeof(buf);
	set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	set->count = 1;
	memcpy(set->data, &efd, sizeof(int32_t));
	if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
		die("VFIO_DEVICE_SET_IRQS");

	uint16_t cmd;
	if (pread(device, &cmd, 2, (off_t)cfg.offset + PCI_COMMAND) != 2)
		die("read PCI_COMMAND");
	cmd |= PCI_COMMAND_MASTER;
	if (pwrite(device, &cmd, 2, (off_t)cfg.offset + PCI_COMMAND) != 2)
		die("write PCI_COMMAND");

	uint64_t *samples = NULL;
	while (scanf("%ld", &rounds) == 1 && rounds > 0) {
		samples = realloc(samples, (size_t)rounds * sizeof(*samples));
		if (!samples)
			die("realloc");
		struct rusage before, after;
		getrusage(RUSAGE_SELF, &before);
		for (long i = 0; i < rounds; i++) {
			uint64_t count, t0 = now_ns();
			regs[EDU_INTR_RAISE / 4] = 1;
			if (read(efd, &count, sizeof(count)) != sizeof(count))
				die("read eventfd");
			uint64_t t1 = now_ns();
			regs[EDU_INTR_ACK / 4] = 1;
			samples[i] = t1 - t0;
		}
		getrusage(RUSAGE_SELF, &after);
		/* printed after the block, so that stdio stays out of the timed rounds */
		printf("%ld", after.ru_nvcsw - before.ru_nvcsw);
		for (long i = 0; i < rounds; i++)
			printf(" %llu", (unsigned long long)samples[i]);
		printf("\n");
		fflush(stdout);
	}
	free(samples);

	set->argsz = sizeof(struct vfio_irq_set);
	set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
	set->count = 0;
	ioctl(device, VFIO_DEVICE_SET_IRQS, set);
	close(efd);
	close(device);
	close(group);
	close(container);
	return 0;
}
