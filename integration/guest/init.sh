#!/bin/sh
# /init of the livedump test guest (busybox sh, PID 1).
#
# Switches on the kernel command line (read from /proc/cmdline):
#   livedump.touch=MIB    fill MIB MiB of anonymous memory with non-zero data,
#                         in a process that stays alive
#   livedump.cache=MIB    write MIB MiB of files into /dev/shm (page cache)
#   livedump.marker=N     place N known strings in N pages of a live process
#                         and print their guest-physical addresses
#   livedump.kmsg=S       write a few awkward messages to the kernel log, then
#                         "LIVEDUMP-KMSG n=N" every S seconds (in the background)
#   livedump.panic=1      crash the kernel (sysrq 'c') once all is set up; boot
#                         with panic=0 so that the machine stays up afterwards
#
# Lines for the host (see linux_guest.py), all on the serial console:
#   LIVEDUMP-GUEST-READY uptime=S    filesystems mounted, about to set up
#   LIVEDUMP-VMCOREINFO PADDR SIZE   /sys/kernel/vmcoreinfo: where the kernel's
#                                    VMCOREINFO note is (hex)
#   LIVEDUMP-KERNEL-TEXT ADDR        the address of _text (KASLR moves it)
#   LIVEDUMP-TOUCH ... / LIVEDUMP-CACHE ... / LIVEDUMP-MARKER ...
#                                    from livedump-guest
#   LIVEDUMP-GUEST-PANIC             about to crash the kernel
#   LIVEDUMP-GUEST-IDLE uptime=S     all done; the guest idles from now on
#   LIVEDUMP-GUEST-ERROR ...         something failed
#
# PID 1 must never exit (the kernel panics if it does), hence the final loop.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm
mount -t tmpfs -o size=90% tmpfs /dev/shm

# Everything goes to the console, whatever the kernel gave us.
exec </dev/console >/dev/console 2>&1

seconds_up() { read -r up _ </proc/uptime; echo "$up"; }

# Hand VMCOREINFO to QEMU, where the VM has -device vmcoreinfo (elsewhere the
# module finds no such device and does nothing): as a user would, for QEMU's
# own dump to carry it.
insmod /lib/qemu_fw_cfg.ko || echo "LIVEDUMP-GUEST-ERROR insmod qemu_fw_cfg failed"
# And tell QEMU of a panic, where the VM has -device pvpanic (elsewhere the
# driver finds no such device and is not loaded: that is no error).
insmod /lib/pvpanic.ko && insmod /lib/pvpanic-mmio.ko 2>/dev/null

# Keep the pages the markers live in where they are: no migration of mlocked
# pages by compaction (see livedump-guest).
echo 0 >/proc/sys/vm/compact_unevictable_allowed 2>/dev/null

# The value of livedump.NAME= on the kernel command line, or empty.
switch() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "livedump.$1="*) echo "${word#*=}"; return ;;
        esac
    done
}

echo "LIVEDUMP-GUEST-READY uptime=$(seconds_up)"
echo "LIVEDUMP-VMCOREINFO $(cat /sys/kernel/vmcoreinfo)"
while read -r address _ name; do
    if [ "$name" = _text ]; then echo "LIVEDUMP-KERNEL-TEXT $address"; break; fi
done </proc/kallsyms

touch_mib=$(switch touch)
if [ -n "$touch_mib" ] && [ "$touch_mib" != 0 ]; then
    livedump-guest touch "$touch_mib" || echo "LIVEDUMP-GUEST-ERROR touch failed"
fi

cache_mib=$(switch cache)
if [ -n "$cache_mib" ] && [ "$cache_mib" != 0 ]; then
    livedump-guest cache "$cache_mib" || echo "LIVEDUMP-GUEST-ERROR cache failed"
fi

markers=$(switch marker)
if [ -n "$markers" ] && [ "$markers" != 0 ]; then
    livedump-guest marker "$markers" || echo "LIVEDUMP-GUEST-ERROR marker failed"
fi

if [ "$(switch panic)" = 1 ]; then
    echo "LIVEDUMP-GUEST-PANIC"
    sleep 0.2  # let the line reach the serial port before the crash
    echo c >/proc/sysrq-trigger
fi

kmsg=$(switch kmsg)
if [ -n "$kmsg" ] && [ "$kmsg" != 0 ]; then
    # Messages that are hard to print (a tab, UTF-8, a control character, two
    # lines in one record), then one message every $kmsg seconds, for ever.
    printf '<4>LIVEDUMP-KMSG-BYTES tab\there caf\303\251 bell\007 end\n' >/dev/kmsg
    printf 'LIVEDUMP-KMSG-LINES first\nsecond\n' >/dev/kmsg
    (
        n=0
        while :; do
            n=$((n + 1))
            echo "LIVEDUMP-KMSG n=$n" >/dev/kmsg
            sleep "$kmsg"
        done
    ) &
fi

echo "LIVEDUMP-GUEST-IDLE uptime=$(seconds_up)"
while :; do
    sleep 3600
done
