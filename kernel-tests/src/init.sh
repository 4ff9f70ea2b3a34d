#!/bin/sh
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
R=/dev/ttyS1
stty -F $R raw -echo 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
echo "LIVEHOST-INIT $(up)" > $R
V=$(uname -r)
for m in $(cat /livehost/modules); do
  out=$(insmod /lib/modules/$V/$m 2>&1) || {
    echo "LIVEHOST-SETUP-FAILED loading module $m failed: $out" > $R
    dmesg | tail -n 20 > /dev/console
    reboot -f
  }
done
[ -f /livehost/env ] && . /livehost/env
T=$(cat /livehost/timeout)
cd /root
echo "LIVEHOST-CMD $(up)" > $R
setsid /bin/sh /livehost/cmd </dev/null >/tmp/.livehost-out 2>/tmp/.livehost-err &
pid=$!
( sleep $T; touch /tmp/.livehost-timedout; kill -9 -$pid 2>/dev/null; kill -9 $pid 2>/dev/null ) &
wd=$!
wait $pid
rc=$?
kill $wd 2>/dev/null
echo "LIVEHOST-CMD-END $(up)" > $R
dmesg > /tmp/.livehost-dmesg 2>&1
{
  echo LIVEHOST-BEGIN
  if [ -e /tmp/.livehost-timedout ]; then echo "status timeout"; else echo "status $rc"; fi
  echo stdout; base64 /tmp/.livehost-out; echo end
  echo stderr; base64 /tmp/.livehost-err; echo end
  echo dmesg; base64 /tmp/.livehost-dmesg; echo end
  echo LIVEHOST-END
} > $R
sync
reboot -f
