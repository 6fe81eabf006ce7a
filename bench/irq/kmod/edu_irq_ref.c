// SPDX-License-Identifier: GPL-2.0
/*
 * edu_irq_ref: the kernel reference for bench/irq.
 *
 * Binds to QEMU's edu device (1234:11e8, QEMU docs/specs/edu.rst), enables its one MSI and
 * times the event the C and Python references time: a write to the interrupt raise register
 * (0x60) -> the code that waits for the interrupt runs. Here that code is the MSI handler
 * itself, in hard-IRQ context, so the figure is what the kernel's own driver would see.
 *
 * /dev/edu_irq_ref (a misc device; the first edu device bound to this driver owns it):
 *   write "N"  runs N rounds in the writer's process context:
 *                t0 = ktime_get_ns(); write 1 to 0x60; wait for the handler (1 s at most)
 *              and the handler stores ktime_get_ns() - t0 (CLOCK_MONOTONIC, the clock the
 *              user-space references read), then acknowledges (0x64) the status it read
 *              (0x24). The write returns its length, or -ETIMEDOUT when an interrupt never
 *              came, -EINVAL for N outside 1..EDU_IRQ_REF_MAX.
 *   read       the last run's samples: N native-endian u64, nanoseconds.
 *
 * It binds only a device whose driver_override names it (write "edu_irq_ref" there, then the
 * address to /sys/bus/pci/drivers_probe, or insmod afterwards): the bench's other edu devices,
 * unbound or with vfio-pci, are left alone.
 */
#include <linux/completion.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/kstrtox.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

/* docs/specs/edu.rst, "Registers" */
#define EDU_INTR_STATUS 0x24 /* RO: raised interrupt bits */
#define EDU_INTR_RAISE 0x60 /* WO: raise these bits */
#define EDU_INTR_ACK 0x64 /* WO: clear these bits (lowers INTx) */

#define EDU_IRQ_REF_MAX 1000000

struct edu_irq_ref {
	struct pci_dev *pdev;
	void __iomem *bar;
	int irq;
	struct mutex lock; /* one run at a time; guards samples/n */
	struct completion done;
	u64 t0; /* set before the raise, read by the handler */
	u64 *samples;
	size_t n; /* samples of the last complete run */
	size_t next; /* the sample the handler fills */
	size_t cap;
};

static struct edu_irq_ref *the_dev; /* the misc device's owner */
static DEFINE_MUTEX(owner_lock);

static irqreturn_t edu_irq_ref_handler(int irq, void *data)
{
	struct edu_irq_ref *d = data;
	u64 t1 = ktime_get_ns(); /* first thing: the handler runs now */
	u32 status = ioread32(d->bar + EDU_INTR_STATUS);

	if (!status)
		return IRQ_NONE;
	iowrite32(status, d->bar + EDU_INTR_ACK);
	if (d->next < d->cap)
		d->samples[d->next] = t1 - READ_ONCE(d->t0);
	complete(&d->done);
	return IRQ_HANDLED;
}

static int edu_irq_ref_run(struct edu_irq_ref *d, size_t rounds)
{
	size_t i;

	if (rounds > d->cap) {
		u64 *s = vmalloc_array(rounds, sizeof(*s));

		if (!s)
			return -ENOMEM;
		/* a late interrupt of a run that timed out must not write into the old array */
		disable_irq(d->irq);
		vfree(d->samples);
		d->samples = s;
		d->cap = rounds;
		enable_irq(d->irq);
	}
	d->n = 0;
	for (i = 0; i < rounds; i++) {
		d->next = i;
		reinit_completion(&d->done);
		WRITE_ONCE(d->t0, ktime_get_ns());
		iowrite32(1, d->bar + EDU_INTR_RAISE);
		if (!wait_for_completion_timeout(&d->done, HZ))
			return -ETIMEDOUT;
	}
	d->n = rounds;
	return 0;
}

static ssize_t edu_irq_ref_write(struct file *f, const char __user *buf, size_t len,
				 loff_t *ppos)
{
	struct edu_irq_ref *d = the_dev;
	unsigned int rounds;
	int err;

	err = kstrtouint_from_user(buf, len, 0, &rounds);
	if (err)
		return err;
	if (rounds < 1 || rounds > EDU_IRQ_REF_MAX)
		return -EINVAL;
	mutex_lock(&d->lock);
	err = edu_irq_ref_run(d, rounds);
	mutex_unlock(&d->lock);
	return err ? err : len;
}

static ssize_t edu_irq_ref_read(struct file *f, char __user *buf, size_t len, loff_t *ppos)
{
	struct edu_irq_ref *d = the_dev;
	ssize_t ret;

	mutex_lock(&d->lock);
	ret = simple_read_from_buffer(buf, len, ppos, d->samples, d->n * sizeof(u64));
	mutex_unlock(&d->lock);
	return ret;
}

static const struct file_operations edu_irq_ref_fops = {
	.owner = THIS_MODULE,
	.read = edu_irq_ref_read,
	.write = edu_irq_ref_write,
	.llseek = default_llseek,
};

static struct miscdevice edu_irq_ref_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "edu_irq_ref",
	.fops = &edu_irq_ref_fops,
	.mode = 0600,
};

static int edu_irq_ref_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_irq_ref *d;
	int err;

	mutex_lock(&owner_lock);
	err = the_dev ? -EBUSY : 0;
	mutex_unlock(&owner_lock);
	if (err) {
		dev_info(&pdev->dev, "another edu device already owns /dev/edu_irq_ref\n");
		return err;
	}
	d = devm_kzalloc(&pdev->dev, sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	d->pdev = pdev;
	mutex_init(&d->lock);
	init_completion(&d->done);

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), "edu_irq_ref");
	if (err)
		return err;
	d->bar = pcim_iomap_table(pdev)[0];
	pci_set_master(pdev); /* an MSI is a memory write by the device */

	err = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI);
	if (err < 0)
		return err;
	d->irq = pci_irq_vector(pdev, 0);
	err = request_irq(d->irq, edu_irq_ref_handler, 0, "edu_irq_ref", d);
	if (err)
		goto free_vectors;
	pci_set_drvdata(pdev, d);

	mutex_lock(&owner_lock);
	the_dev = d;
	mutex_unlock(&owner_lock);
	err = misc_register(&edu_irq_ref_misc);
	if (err)
		goto free_irq;
	dev_info(&pdev->dev, "edu_irq_ref: MSI on irq %d, /dev/edu_irq_ref\n", d->irq);
	return 0;

free_irq:
	mutex_lock(&owner_lock);
	the_dev = NULL;
	mutex_unlock(&owner_lock);
	free_irq(d->irq, d);
free_vectors:
	pci_free_irq_vectors(pdev);
	return err;
}

static void edu_irq_ref_remove(struct pci_dev *pdev)
{
	struct edu_irq_ref *d = pci_get_drvdata(pdev);

	misc_deregister(&edu_irq_ref_misc);
	mutex_lock(&owner_lock);
	the_dev = NULL;
	mutex_unlock(&owner_lock);
	free_irq(d->irq, d);
	pci_free_irq_vectors(pdev);
	vfree(d->samples);
}

/*
 * QEMU edu, matched only when its driver_override names this driver (override_only,
 * include/linux/mod_devicetable.h; the VFIO flag is the one nonzero value the core defines,
 * and any nonzero value means "only through driver_override"). No MODULE_DEVICE_TABLE: the
 * module is never loaded for a device by itself.
 */
static const struct pci_device_id edu_irq_ref_ids[] = {
	{ PCI_DEVICE_DRIVER_OVERRIDE(0x1234, 0x11e8, PCI_ID_F_VFIO_DRIVER_OVERRIDE) },
	{}
};

static struct pci_driver edu_irq_ref_driver = {
	.name = "edu_irq_ref",
	.id_table = edu_irq_ref_ids,
	.probe = edu_irq_ref_probe,
	.remove = edu_irq_ref_remove,
};
module_pci_driver(edu_irq_ref_driver);

MODULE_DESCRIPTION("udrv bench/irq: edu MSI response time measured in the kernel");
MODULE_LICENSE("GPL");
