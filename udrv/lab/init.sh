#!/bin/busybox sh
# udrv lab guest /init (runs from the initramfs; busybox only).
# Mounts the host's / (9p, read-only) as the lower layer of an overlay with a tmpfs upper
# layer, so the guest sees the host's files and programs but its writes stay in the guest.
# The read-write shares (control channel, results) are mounted at their host paths, then
# we chroot and hand over to the agent, which runs the host's commands.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec 0</dev/console 1>/dev/console 2>/dev/console

die() { echo "udrv-lab-init: $*"; echo o > /proc/sysrq-trigger; sleep 10; }

for m in netfs 9pnet 9pnet_virtio 9p overlay; do
    insmod /lib/$m.ko || die "insmod $m failed"
done
P9="trans=virtio,version=9p2000.L,msize=524288"
mount -t 9p -o "$P9,ro,cache=loose" udrvroot /lower || die "cannot mount the host root share"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || die "cannot mount the overlay root"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs run /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/hugepages
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t hugetlbfs hugetlbfs /newroot/dev/hugepages
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
CTL=/run/udrv-ctl
mkdir -p "/newroot$CTL"
mount -t 9p -o "$P9,cache=none" udrvctl "/newroot$CTL" || die "cannot mount the control share"
# Per-session settings written by the host: UDRV_LAB_RESULTS, UDRV_LAB_KERNEL, ...
. "/newroot$CTL/session.env"
mkdir -p "/newroot$UDRV_LAB_RESULTS"
mount -t 9p -o "$P9,cache=none" udrvresults "/newroot$UDRV_LAB_RESULTS" || die "cannot mount the results share"
mkdir -p /newroot/lib/modules
mount --bind "/newroot$UDRV_LAB_KERNEL/lib/modules" /newroot/lib/modules
exec chroot /newroot /bin/sh "$CTL/agent.sh"
