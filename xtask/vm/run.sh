#!/bin/bash
# Run ONE command inside a throw-away qemu VM (Debian kernel with kTLS + BPF sockmap),
# using the host's root filesystem (9p, read-only) as the guest's root.
#   run.sh <command> [args...]
# Exit status = the command's exit status (124 = command hit VM_TIMEOUT,
# 125 = VM/infrastructure failure).  The command's stdout/stderr go to our stdout/stderr.
# Environment knobs:
#   VM_TIMEOUT=600        seconds the command may run (guest-side `timeout`)
#   VM_ACCEL=auto|kvm|tcg auto: try KVM, fall back to TCG if the VM dies/hangs before the command starts
#   VM_RW_DIRS=/work/main colon-separated host dirs exported read-write at the same path
#   VM_OVERLAY=0          1: writable (discarded) overlay on top of the read-only host root
#   VM_MEM=2048 VM_CPUS=2 VM_DEBUG=0 (1: always print the guest console log to stderr)
#   VM_KEEP=0             1: keep the per-run directory $LB_VM_DIR/runs/run.* (console.log etc.)
#   VM_QUIET=0            1: no "run.sh: accel=... exit=... vm-time=..." line on stderr
#   VM_APPEND / VM_QEMU_ARGS  extra kernel command line / extra qemu arguments
# Not available in the VM: stdin (it is /dev/null), the host's /tmp and /run (fresh tmpfs),
# network other than lo.  Everything else of the host is visible read-only.
set -u
VMDIR=${LB_VM_DIR:?set LB_VM_DIR to the directory of the VM files (not under /tmp: the guest does not see the host /tmp)}
[ $# -ge 1 ] || { echo "usage: $0 <command> [args...]" >&2; exit 2; }
[ -f $VMDIR/initramfs.cpio.gz ] && [ -e $VMDIR/vmlinuz ] || { echo "run.sh: run $VMDIR/setup.sh first" >&2; exit 125; }

VM_TIMEOUT=${VM_TIMEOUT:-600}
VM_ACCEL=${VM_ACCEL:-auto}
VM_RW_DIRS=${VM_RW_DIRS-/work/main}
VM_MEM=${VM_MEM:-2048}
VM_CPUS=${VM_CPUS:-2}
KVM_BOOT_DEADLINE=${KVM_BOOT_DEADLINE:-60}   # KVM must reach the command within this many seconds

mkdir -p $VMDIR/runs
RUN=$(mktemp -d $VMDIR/runs/run.XXXXXX) || exit 125
PIDS=()
cleanup() {
  [ -s "$RUN/qemu.pid" ] && kill "$(cat "$RUN/qemu.pid")" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ "${VM_KEEP:-0}" = 1 ] || rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the script the guest runs (chrooted into the host root) -------------------
{
  echo '#!/bin/bash'
  export -p | grep -vE '^declare -x (PWD|OLDPWD|SHLVL|_|TERM)='
  echo 'export TERM=dumb'
  printf 'cd -- %q || { echo "run.sh (guest): cannot cd to %q (not visible in the VM? /tmp is a fresh tmpfs there)" >&2; exit 125; }\n' "$PWD" "$PWD"
  printf 'exec timeout -k 10 %q' "$VM_TIMEOUT"
  printf ' %q' "$@"
  echo
} > "$RUN/cmd.sh"
[ "${VM_OVERLAY:-0}" = 1 ] && touch "$RUN/overlay"

SHARE_ARGS=()
i=0
IFS=: read -r -a rwdirs <<< "$VM_RW_DIRS"
for d in "${rwdirs[@]}"; do
  [ -n "$d" ] && [ -d "$d" ] || continue
  d=$(cd "$d" && pwd -P)
  SHARE_ARGS+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=none,multidevs=remap")
  echo "rw$i $d" >> "$RUN/shares"
  i=$((i+1))
done

run_qemu() {   # $1 = kvm|tcg ; returns qemu's status
  local accel=$1 qpid start
  rm -f "$RUN/started" "$RUN/status" "$RUN/out" "$RUN/err" "$RUN/qemu.pid"
  mkfifo "$RUN/out" "$RUN/err"
  cat "$RUN/out" & local c1=$!
  cat "$RUN/err" >&2 & local c2=$!
  PIDS=($c1 $c2)
  local acc_args
  if [ "$accel" = kvm ]; then acc_args=(-enable-kvm -cpu host)
  else acc_args=(-accel tcg,thread=multi -cpu max); fi
  ( cd "$RUN" && ulimit -c 0 && timeout -k 5 $((VM_TIMEOUT + 240)) qemu-system-x86_64 \
    "${acc_args[@]}" -machine q35 -smp "$VM_CPUS" -m "$VM_MEM" \
    -nographic -no-reboot -monitor none -serial "file:$RUN/console.log" -pidfile "$RUN/qemu.pid" \
    -kernel $VMDIR/vmlinuz -initrd $VMDIR/initramfs.cpio.gz \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic tsc=reliable ${VM_APPEND:-}" ${VM_QEMU_ARGS:-} \
    -nic none \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$RUN,mount_tag=vmrun,security_model=none,multidevs=remap" \
    "${SHARE_ARGS[@]}" \
    -device virtio-serial-pci \
    -chardev "file,id=out,path=$RUN/out" -device virtserialport,chardev=out,name=out \
    -chardev "file,id=err,path=$RUN/err" -device virtserialport,chardev=err,name=err \
    ; exit $? ) </dev/null >"$RUN/qemu.log" 2>&1 &
  qpid=$!
  PIDS+=($qpid)
  if [ "$accel" = kvm ]; then   # watchdog: KVM must get to the command quickly
    start=$SECONDS
    while kill -0 $qpid 2>/dev/null && [ ! -e "$RUN/started" ]; do
      if [ $((SECONDS - start)) -ge "$KVM_BOOT_DEADLINE" ]; then
        echo "run.sh: KVM guest did not start the command within ${KVM_BOOT_DEADLINE}s, killing it" >&2
        # qemu itself, not the subshell around it: killing only the subshell left qemu (and its
        # `timeout`) running for the whole outer time limit, a CPU's worth beside the TCG run.
        [ -s "$RUN/qemu.pid" ] && kill "$(cat "$RUN/qemu.pid")" 2>/dev/null
        pkill -P $qpid 2>/dev/null
        break
      fi
      sleep 0.2
    done
  fi
  wait $qpid 2>/dev/null; local rc=$?
  rm -f "$RUN/qemu.pid"
  # If qemu died before opening the FIFOs, the readers would block in open():
  # briefly add (and drop) a writer so they always see EOF.
  exec 3<>"$RUN/out" 4<>"$RUN/err"; exec 3>&- 4>&-
  local n=0
  while { kill -0 $c1 || kill -0 $c2; } 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  kill $c1 $c2 2>/dev/null; wait $c1 $c2 2>/dev/null
  PIDS=()
  return $rc
}

T0=$(date +%s.%N)
accel=$VM_ACCEL
[ "$accel" = auto ] && { [ -w /dev/kvm ] && accel=kvm || accel=tcg; }
run_qemu $accel; qrc=$?
if [ "$accel" = kvm ] && [ ! -e "$RUN/started" ] && [ "$VM_ACCEL" = auto ]; then
  echo "run.sh: KVM failed ($(grep -m1 -iE 'error|fail|assert' "$RUN/qemu.log" || echo "qemu exit $qrc")); falling back to TCG (slower, software emulation)" >&2
  accel=tcg
  run_qemu tcg; qrc=$?
fi
T1=$(date +%s.%N)

if [ -s "$RUN/status" ]; then
  rc=$(cat "$RUN/status")
else
  rc=125
  [ $qrc = 124 ] && echo "run.sh: VM hit the outer time limit ($((VM_TIMEOUT + 240))s) and was killed" >&2
  echo "run.sh: no exit status from the VM (qemu exit $qrc); console/qemu log tail:" >&2
  tail -n 30 "$RUN/console.log" "$RUN/qemu.log" >&2 2>/dev/null
fi
if [ "${VM_DEBUG:-0}" = 1 ]; then
  echo "---- guest console ($RUN/console.log) ----" >&2; cat "$RUN/console.log" >&2
fi
[ "${VM_QUIET:-0}" = 1 ] || awk -v a="$accel" -v r="$rc" -v t0="$T0" -v t1="$T1" 'BEGIN{printf "run.sh: accel=%s exit=%s vm-time=%.1fs\n", a, r, t1-t0}' >&2
exit "$rc"
