"""`udrv lab setup`: install and cache what the lab needs, idempotently.

1. Debian packages: QEMU, a static busybox for the initramfs, cpio, kmod (depmod/modprobe),
   pciutils (lspci is the tests' oracle), xz-utils, and the ordinary programs tests run in
   the guest against udrv's devices (mkfs.ext4, fio, blkdiscard, nbdinfo, qemu-img, ip,
   ping, gcc for C reference programs, dmsetup for the bind safety checks).
2. A Debian 6.12 kernel (``linux-image-6.12.*+deb12-amd64-unsigned``): vmlinuz plus modules for
   vfio-pci, uio_pci_generic, ublk_drv, nbd, cuse, tun, null_blk and 9p. Old point releases
   vanish from the archive, so the newest available name is resolved at install time; the
   unpacked tree is cached under the lab directory.
3. An initramfs: busybox, the 9p/overlay modules (decompressed) and ``init.sh``.
4. That kernel's headers (``linux-headers-<release>``, its ``-common`` half and
   ``linux-kbuild``), unpacked under the lab directory, so that out-of-tree modules (bench/irq's
   kernel reference) build on the host for the guest: ``make -C $(headers_dir(release))
   M=... modules``.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from udrv.errors import LabSetupError
from udrv.lab.paths import INITRAMFS_MODULES, Installed, installed, lab_dir, save_state

#: Debian package -> a file it installs, to check for it without dpkg.
APT_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
    "cpio": "/usr/bin/cpio",
    "kmod": "/usr/sbin/depmod",
    "pciutils": "/usr/bin/lspci",
    "xz-utils": "/usr/bin/xz",
    # Ordinary programs the lab tests run against udrv's devices (visible in the guest).
    "e2fsprogs": "/usr/sbin/mkfs.ext4",
    "fio": "/usr/bin/fio",
    "util-linux": "/usr/sbin/blkdiscard",
    "libnbd-bin": "/usr/bin/nbdinfo",
    "qemu-utils": "/usr/bin/qemu-img",
    "nbd-client": "/usr/sbin/nbd-client",
    "nbdkit-plugin-python": "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so",
    "iproute2": "/usr/sbin/ip",
    "iputils-ping": "/usr/bin/ping",
    "iperf3": "/usr/bin/iperf3",
    "gcc": "/usr/bin/gcc",
    "dmsetup": "/usr/sbin/dmsetup",  # tests/lab/test_bind_safety.py: a dm target on an NVMe
    "strace": "/usr/bin/strace",  # bench.block: system calls per I/O of the driver process
    # The lab kernel's headers build modules with it (CC in their .kernelvariables).
    "gcc-12": "/usr/bin/x86_64-linux-gnu-gcc-12",
    "make": "/usr/bin/make",
}
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(6\.12\.\d+\+deb12-amd64)-unsigned$")

Report = Callable[[str], None]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LabSetupError(f"{what}: {cmd[0]} is not installed") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise LabSetupError(f"{what}: `{' '.join(cmd)}` failed:\n  " + "\n  ".join(tail))
    return proc.stdout


def missing_packages() -> list[str]:
    """Debian packages the lab needs that are not installed."""
    return [pkg for pkg, path in APT_PACKAGES.items() if not Path(path).exists()]


def install_packages(report: Report) -> None:
    missing = missing_packages()
    if not missing:
        report("Debian packages: all present")
        return
    if os.geteuid() != 0:
        raise LabSetupError(
            f"the lab needs {', '.join(missing)}; run `sudo apt-get install {' '.join(missing)}`"
            " or `sudo udrv lab setup`"
        )
    report(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            raise LabSetupError(f"`{' '.join(cmd)}` failed:\n  " + "\n  ".join(tail))


def newest_kernel_package() -> str:
    """The newest ``linux-image-6.12.*+deb12-amd64-unsigned`` the archive offers."""

    def search() -> list[str]:
        out = _run(
            ["apt-cache", "search", "--names-only", r"^linux-image-6\.12\..*-amd64-unsigned$"],
            "looking up the lab kernel",
        )
        return [ln.split()[0] for ln in out.splitlines() if KERNEL_PACKAGE_RE.match(ln.split()[0])]

    names = search()
    if not names and os.geteuid() == 0:
        _run(["apt-get", "update", "-q"], "apt-get update")
        names = search()
    if not names:
        raise LabSetupError(
            "no linux-image-6.12.*+deb12-amd64-unsigned package is available; enable Debian's "
            "bookworm-security (or bookworm-updates) archive and run `apt-get update`"
        )

    def version(name: str) -> tuple[int, ...]:
        m = KERNEL_PACKAGE_RE.match(name)
        assert m
        return tuple(int(x) for x in re.findall(r"\d+", m.group(1).split("+")[0]))

    return max(names, key=version)


def install_kernel(report: Report) -> tuple[str, str, Path]:
    """Download and unpack the newest 6.12 kernel, unless it is already cached."""
    package = newest_kernel_package()
    m = KERNEL_PACKAGE_RE.match(package)
    assert m
    release = m.group(1)
    root = lab_dir() / "kernel" / release
    if (root / "lib" / "modules" / release / "modules.dep").exists():
        report(f"kernel {release}: cached in {root}")
        return package, release, root
    report(f"downloading {package}")
    with tempfile.TemporaryDirectory(dir=lab_dir()) as tmp:
        _run(["apt-get", "download", package], f"downloading {package}", cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise LabSetupError(f"apt-get download {package} produced no .deb")
        report(f"unpacking {debs[0].name}")
        staging = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(staging)], f"unpacking {debs[0].name}")
        _run(["depmod", "-b", str(staging), release], f"depmod for {release}")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)
    return package, release, root


def initramfs_path(release: str) -> Path:
    """The initramfs for this kernel and this version of ``init.sh`` (named by its hash)."""
    init = resources.files("udrv.lab").joinpath("init.sh").read_bytes()
    return lab_dir() / f"initramfs-{release}-{hashlib.sha256(init).hexdigest()[:12]}.cpio.gz"


def ensure_initramfs(release: str, root: Path, report: Report = lambda _: None) -> Path:
    """The initramfs for the current ``init.sh``, built if it is not there yet."""
    out = initramfs_path(release)
    return out if out.exists() else build_initramfs(release, root, report)


def build_initramfs(release: str, root: Path, report: Report) -> Path:
    """A gzip'd newc cpio with busybox, the 9p/overlay modules and the guest's /init."""
    init = resources.files("udrv.lab").joinpath("init.sh").read_bytes()
    out = initramfs_path(release)
    deps = (root / "lib" / "modules" / release / "modules.dep").read_text()
    with tempfile.TemporaryDirectory(dir=lab_dir()) as tmp:
        tree = Path(tmp) / "tree"
        for d in ("bin", "lib", "dev", "proc", "sys"):
            (tree / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
        (tree / "init").write_bytes(init)
        (tree / "init").chmod(0o755)
        for name in INITRAMFS_MODULES:
            rel = next(
                (
                    ln.split(":")[0]
                    for ln in deps.splitlines()
                    if ln.split(":")[0].endswith(f"/{name}.ko.xz")
                ),
                None,
            )
            if rel is None:
                raise LabSetupError(f"kernel {release} has no {name} module; the lab needs it")
            src = root / "lib" / "modules" / release / rel
            (tree / "lib" / f"{name}.ko").write_bytes(lzma.decompress(src.read_bytes()))
        report(f"writing {out.name}")
        files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            input="\n".join([".", *files]).encode(),
            cwd=tree,
            capture_output=True,
            check=False,
        )
        if cpio.returncode != 0:
            raise LabSetupError(f"cpio failed: {cpio.stderr.decode(errors='replace').strip()}")
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        tmp_out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6))
        tmp_out.rename(out)
    return out


def headers_packages(release: str) -> list[str]:
    """The Debian packages that hold the headers of kernel ``release``.

    ``linux-headers-6.12.117+deb12-amd64`` (the flavour's config, Module.symvers, generated
    headers) depends on ``linux-headers-6.12.117+deb12-common`` (the source headers and
    Makefiles) and ``linux-kbuild-6.12.117+deb12`` (modpost, fixdep and the kbuild scripts).
    """
    base, _, flavour = release.rpartition("-")
    if not base or not flavour:
        raise LabSetupError(f"kernel release {release!r} has no flavour (like -amd64)")
    return [f"linux-headers-{release}", f"linux-headers-{base}-common", f"linux-kbuild-{base}"]


def headers_root(release: str) -> Path:
    """Where the headers packages of ``release`` are unpacked (their ``/`` )."""
    return lab_dir() / "headers" / release


def headers_dir(release: str) -> Path:
    """The kbuild directory for ``release``: ``make -C`` this with ``M=`` a module's source."""
    return headers_root(release) / "usr" / "src" / f"linux-headers-{release}"


def install_headers(release: str, report: Report = print) -> Path:
    """Download and unpack the headers of kernel ``release``, unless they are there already.

    The packages are unpacked (``dpkg-deb -x``), not installed: installing them would pull the
    kernel image into the host's /boot. Their one absolute reference, the flavour Makefile's
    ``include /usr/src/linux-headers-<base>-common/Makefile``, is pointed at the unpacked copy;
    the other links between them are relative.

    Returns:
        :func:`headers_dir` of ``release``.

    Raises:
        LabSetupError: a package cannot be downloaded or unpacked.
    """
    build = headers_dir(release)
    if (build / "Module.symvers").exists():
        report(f"kernel headers {release}: cached in {headers_root(release)}")
        return build
    packages = headers_packages(release)
    report(f"downloading {', '.join(packages)}")
    root = headers_root(release)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        _run(["apt-get", "download", *packages], f"downloading the headers of {release}", Path(tmp))
        staging = Path(tmp) / "root"
        for deb in sorted(Path(tmp).glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(staging)], f"unpacking {deb.name}")
        makefile = staging / build.relative_to(root) / "Makefile"
        try:
            text = makefile.read_text()
        except OSError as exc:
            raise LabSetupError(f"linux-headers-{release} has no Makefile: {exc}") from None
        makefile.write_text(text.replace("include /usr/src/", f"include {root}/usr/src/"))
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    return build


def setup(report: Report = print) -> Installed:
    """Install everything the lab needs; cheap when it is all there already."""
    lab_dir().mkdir(parents=True, exist_ok=True)
    install_packages(report)
    package, release, root = install_kernel(report)
    initramfs = ensure_initramfs(release, root, report)
    install_headers(release, report)
    inst = Installed(kernel_release=release, package=package, root=root, initramfs=initramfs)
    save_state(inst)
    installed()  # re-check what we wrote
    report(f"lab ready: kernel {release}, {lab_dir()}")
    return inst
