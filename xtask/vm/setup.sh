#!/bin/bash
# Idempotent setup for run.sh: installs qemu + busybox-static (if missing),
# downloads one of Debian's kernel packages (LB_VM_KERNEL: 6.12 from bookworm-backports, the
# default, or 6.1 from bookworm), extracts it under $LB_VM_DIR/kernel (NOT into the host's
# /boot) and builds a minimal busybox initramfs with the 9p / overlay modules.
# One $LB_VM_DIR per kernel: a directory holds one kernel and its initramfs.
# Usage: setup.sh [--force]     (--force rebuilds the initramfs)
# Environment: LB_VM_DIR (required), LB_VM_KERNEL=6.12|6.1,
#   LB_VM_APT_DIR (default $LB_VM_DIR/apt: the private apt lists and cache, shareable by VMs)
set -euo pipefail
SELF=$(realpath "$0")

VMDIR=${LB_VM_DIR:?set LB_VM_DIR to the directory of the VM files (not under /tmp: the guest does not see the host /tmp)}
KERNEL=${LB_VM_KERNEL:-6.12}
FORCE=${1:-}
cd "$VMDIR" 2>/dev/null || { mkdir -p "$VMDIR"; cd "$VMDIR"; }
VMDIR=$(pwd -P)
log() { echo "setup: $*" >&2; }
# bookworm's own kernel series, or the backports' (a NotAutomatic suite: only with -t)
case $KERNEL in
  6.1) SUITE_ARGS=() ;;
  6.12) SUITE_ARGS=(-t bookworm-backports) ;;
  *) log "LB_VM_KERNEL=$KERNEL: expected 6.1 (bookworm) or 6.12 (bookworm-backports)"; exit 2 ;;
esac

export DEBIAN_FRONTEND=noninteractive

# --- private apt configuration (host's /etc/apt is left alone) -----------------
APTDIR=${LB_VM_APT_DIR:-$VMDIR/apt}
mkdir -p "$APTDIR"/lists/partial "$APTDIR"/cache/archives/partial debs
APTDIR=$(cd "$APTDIR" && pwd -P)
cat > "$APTDIR/sources.list.tmp" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
mv "$APTDIR/sources.list.tmp" "$APTDIR/sources.list"
APT=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache")
if [ -z "$(find "$APTDIR/lists" -name '*backports*Packages*' -mmin -1440 2>/dev/null)" ]; then
  log "apt-get update (private lists incl. bookworm-backports)"
  apt-get "${APT[@]}" update -qq
fi

# --- host packages ---------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
  extra=()
  # If qemu-utils from backports is installed, qemu-system-x86 must come from
  # backports too (otherwise apt removes qemu-utils to resolve the version conflict).
  if [[ " ${need[*]} " == *" qemu-system-x86 "* ]] && \
     dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    extra=(-t bookworm-backports)
  fi
  log "installing: ${need[*]} ${extra[*]}"
  apt-get "${APT[@]}" install -y --no-install-recommends "${extra[@]}" "${need[@]}"
fi

# --- kernel package -------------------------------------------------------------
# linux-image-amd64 (metapackage) -> its dependency is the real image package.
KPKG=$(apt-cache "${APT[@]}" "${SUITE_ARGS[@]}" depends linux-image-amd64 2>/dev/null |
       awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { log "cannot resolve linux-image-amd64 (${SUITE_ARGS[*]:-bookworm})"; exit 1; }
KVER=${KPKG#linux-image-}            # e.g. 6.12.95+deb12-amd64
KVER=${KVER%-unsigned}
case $KVER in
  "$KERNEL".*) ;;
  *) log "LB_VM_KERNEL=$KERNEL but the suite's kernel is $KVER"; exit 1 ;;
esac
log "kernel package: $KPKG (version $KVER)"

DEB=$(ls debs/"${KPKG}"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$DEB" ]; then
  (cd debs && apt-get "${APT[@]}" download "$KPKG" 2>&1 | grep -v 'unsandboxed' || true)
  DEB=$(ls debs/"${KPKG}"_*.deb | head -1)
fi
if [ ! -f "kernel/boot/vmlinuz-$KVER" ]; then
  rm -rf kernel.tmp && mkdir kernel.tmp
  dpkg-deb -x "$DEB" kernel.tmp
  rm -rf kernel && mv kernel.tmp kernel
  FORCE=--force
fi
CFG=kernel/boot/config-$KVER
for opt in CONFIG_TLS CONFIG_BPF_STREAM_PARSER CONFIG_NET_9P CONFIG_NET_9P_VIRTIO CONFIG_9P_FS \
           CONFIG_VIRTIO_PCI CONFIG_VIRTIO_CONSOLE CONFIG_DEVTMPFS CONFIG_BPF_SYSCALL \
           CONFIG_NET_SOCK_MSG CONFIG_OVERLAY_FS; do
  v=$(grep -E "^$opt=" "$CFG" | cut -d= -f2 || true)
  [ -n "$v" ] || { log "MISSING $opt in $CFG"; exit 1; }
  log "  $opt=$v"
done
# modules.dep/.alias for the guest's on-demand module loading (busybox modprobe reads .ko.xz)
if [ ! -s "kernel/lib/modules/$KVER/modules.alias" ] || [ "kernel/lib/modules/$KVER/modules.order" -nt "kernel/lib/modules/$KVER/modules.alias" ]; then
  log "busybox depmod -b $VMDIR/kernel $KVER"
  /bin/busybox depmod -b "$VMDIR/kernel" "$KVER"
fi
ln -sfn "kernel/boot/vmlinuz-$KVER" vmlinuz
echo "$KVER" > kernel.version

# --- initramfs ------------------------------------------------------------------
if [ -f initramfs.cpio.gz ] && [ "$FORCE" != --force ] && [ initramfs.cpio.gz -nt "$SELF" ]; then
  log "initramfs.cpio.gz up to date"; exit 0
fi
MODDIR=kernel/lib/modules/$KVER
IR=$VMDIR/initramfs.tmp
rm -rf "$IR"; mkdir -p "$IR"/{bin,sbin,dev,proc,sys,host,newroot,vmrun,lib/modules,early}
cp /bin/busybox "$IR/bin/busybox"

declare -A done_mod=()
order=()
add_mod() {   # add module $1 after its dependencies (read from .modinfo "depends=")
  local m=$1 f deps d
  [ -n "${done_mod[$m]:-}" ] && return 0
  done_mod[$m]=1
  f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
       -o -name "${m//_/-}.ko*" \) | head -1)
  [ -n "$f" ] || { grep -qE "/$m\.ko" "$MODDIR/modules.builtin" && return 0; log "module $m not found"; exit 1; }
  case $f in
    *.xz) xz -dc "$f" > "$IR/early/$m.ko";;
    *.zst) zstd -qdc "$f" > "$IR/early/$m.ko";;
    *) cp "$f" "$IR/early/$m.ko";;
  esac
  deps=$(grep -a -o 'depends=[^[:cntrl:]]*' "$IR/early/$m.ko" | head -1 | cut -d= -f2)
  for d in ${deps//,/ }; do add_mod "$d"; done
  order+=("$m")
}
# only what is needed to reach the host root; everything else (tls, crypto, ...) is loaded
# on demand from $VMDIR/kernel/lib/modules via the 9p host root
for m in virtio_pci virtio_console 9pnet_virtio 9p overlay; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > "$IR/early/load.order"
log "initramfs modules (load order): ${order[*]}"
echo "$KVER" > "$IR/kver"
echo "$VMDIR" > "$IR/vmdir"

cat > "$IR/init" <<'EOF'
#!/bin/busybox sh
# Minimal init (PID 1 stays in the initramfs): mount the host root (9p), run
# /run/vm/cmd.sh chrooted into it, record the exit status, power off.
/bin/busybox --install -s /bin
ln -s /bin/busybox /sbin/modprobe      # kernel's request_module() helper (runs in this root)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
say() { echo "vm-init: $*"; }
die() { say "FATAL: $*"; echo "VMRUN-EXIT-STATUS=125"; echo 125 > /vmrun/status 2>/dev/null; sync; poweroff -f; sleep 5; exit 1; }

while read -r m; do insmod /early/$m.ko || say "insmod $m failed"; done < /early/load.order

P9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $P9,cache=none vmrun /vmrun || die "mount vmrun"
mount -t 9p -o ro,$P9,cache=loose hostroot /host || die "mount hostroot"
# all modules of the guest kernel, straight from the extracted package on the host
KVER=$(cat /kver); VMDIR=$(cat /vmdir)
mkdir -p /lib/modules/$KVER
mount --bind /host$VMDIR/kernel/lib/modules/$KVER /lib/modules/$KVER || say "no module tree"
modprobe tls || say "modprobe tls failed"

R=/newroot
if [ -f /vmrun/overlay ]; then
  # writable (throw-away) root: overlay with the read-only host root as lower layer
  mkdir -p /upper && mount -t tmpfs -o mode=0755 tmpfs /upper && mkdir -p /upper/u /upper/w
  mount -t overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w overlay $R \
    || { say "overlay failed, using read-only root"; mount --bind /host $R; }
else
  mount --bind /host $R
fi
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
[ -d $R/var/tmp ] && mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf || say "bpffs mount failed"
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mkdir -p $R/run/vm && mount --bind /vmrun $R/run/vm
# extra read-write shares: lines "tag path"
if [ -f /vmrun/shares ]; then
  while read -r tag path; do
    [ -n "$tag" ] || continue
    mkdir -p "$R$path" 2>/dev/null
    if mount -t 9p -o $P9,cache=none "$tag" "$R$path"; then
      say "$path mounted ($(awk -v p="$R$path" '$2==p{split($4,o,",");print o[1]}' /proc/mounts))"
    else
      say "could not mount share $tag on $path"
    fi
  done < /vmrun/shares
fi
ip link set lo up || ifconfig lo 127.0.0.1 up
hostname vm

OUT=/dev/console ERR=/dev/console
for d in /sys/class/virtio-ports/*; do
  [ -e "$d/name" ] || continue
  case $(cat $d/name) in out) OUT=/dev/${d##*/};; err) ERR=/dev/${d##*/};; esac
done
: > /vmrun/started
chroot $R /bin/bash /run/vm/cmd.sh </dev/null >$OUT 2>$ERR
rc=$?
echo $rc > /vmrun/status
echo "VMRUN-EXIT-STATUS=$rc"
sync
poweroff -f
sleep 10
EOF
chmod +x "$IR/init"
(cd "$IR" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$VMDIR/initramfs.cpio.gz.tmp")
mv initramfs.cpio.gz.tmp initramfs.cpio.gz
rm -rf "$IR"
log "built $VMDIR/initramfs.cpio.gz ($(du -h initramfs.cpio.gz | cut -f1)), kernel $VMDIR/vmlinuz -> vmlinuz-$KVER"
