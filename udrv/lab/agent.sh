# udrv lab agent: runs inside the guest (chrooted into the host's root), as root.
# The host drops numbered scripts N.sh into the control share; we run them in order,
# writing N.out, N.err and finally N.rc. A file named "poweroff" ends the session.
ctl=/run/udrv-ctl
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
hostname udrv-lab 2>/dev/null
ip link set lo up 2>/dev/null
# The kernel interfaces drivers use; absent ones are reported by the tests that need them.
for m in $UDRV_LAB_MODULES; do modprobe "$m" 2>>"$ctl/modprobe.err"; done
echo "$(uname -r)" > "$ctl/ready"
n=0
while :; do
    if [ -e "$ctl/$n.sh" ]; then
        sh "$ctl/$n.sh" > "$ctl/$n.out" 2> "$ctl/$n.err" < /dev/null
        echo $? > "$ctl/$n.rc.tmp"
        mv "$ctl/$n.rc.tmp" "$ctl/$n.rc"
        n=$((n + 1))
    elif [ -e "$ctl/poweroff" ]; then
        break
    else
        sleep 0.02
    fi
done
sync
echo o > /proc/sysrq-trigger
sleep 10
