#!/bin/sh
# ChromeDriver's `binary` for `ChromeDriver::browser_in` (tests/src/lib.rs): starts Chromium
# inside the network namespace named by its `--weft-netns=NAME` argument. ChromeDriver talks
# to it over `--remote-debugging-pipe` (fds 3 and 4), which `ip netns exec` passes on.
# Chromium ignores the unknown switch.
netns=
for arg in "$@"; do
    case "$arg" in
        --weft-netns=*) netns="${arg#--weft-netns=}" ;;
    esac
done
if [ -z "$netns" ]; then
    echo "chromium-in-netns.sh: no --weft-netns=NAME argument" >&2
    exit 2
fi
exec ip netns exec "$netns" /usr/bin/chromium "$@"
