#!/bin/sh
# The run's nonce: every line of our report carries it, and the host accepts
# no other. It is read and deleted before anything else runs, so the command
# under test cannot read it and cannot forge a report.
N=$(cat /livehost/nonce)
rm -f /livehost/nonce
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname livehost-guest
ip link set lo up 2>/dev/null
# The result port stays open on fd 9 for init alone; its device node goes,
# and the command starts with fd 9 closed.
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 9>/dev/ttyS1
rm -f /dev/ttyS1
up() { cut -d' ' -f1 /proc/uptime; }
echo "LIVEHOST-INIT $N $(up)" >&9
V=$(uname -r)
for m in $(cat /livehost/modules); do
  out=$(insmod /lib/modules/$V/$m 2>&1) || {
    echo "LIVEHOST-SETUP-FAILED $N loading module $m failed: $out" | tr '\n' ' ' >&9
    echo >&9
    dmesg | tail -n 20 > /dev/console
    reboot -f
  }
done
[ -f /livehost/env ] && . /livehost/env
T=$(cat /livehost/timeout)
cd /root
echo "LIVEHOST-CMD $N $(up)" >&9
setsid /bin/sh /livehost/cmd </dev/null >/tmp/.livehost-out 2>/tmp/.livehost-err 9>&- &
pid=$!
# The watchdog's own exit status (42) says the time limit struck (it ignores
# our TERM once it starts killing): no file the
# command could create or delete decides it.
( sleep $T; trap "" TERM; kill -9 -$pid 2>/dev/null; kill -9 $pid 2>/dev/null; exit 42 ) 9>&- &
wd=$!
wait $pid
rc=$?
kill $wd 2>/dev/null
wait $wd
wdrc=$?
echo "LIVEHOST-CMD-END $N $(up)" >&9
dmesg > /tmp/.livehost-dmesg 2>&1
section() {
  echo "$1 $N"
  base64 "$2"
  echo "end $N $(sha256sum < "$2" | cut -d' ' -f1)"
}
{
  echo "LIVEHOST-BEGIN $N"
  if [ "$wdrc" = 42 ]; then echo "status $N timeout"; else echo "status $N $rc"; fi
  section stdout /tmp/.livehost-out
  section stderr /tmp/.livehost-err
  section dmesg /tmp/.livehost-dmesg
  echo "LIVEHOST-END $N"
} >&9
sync
reboot -f
