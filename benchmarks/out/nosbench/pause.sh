#!/bin/bash
# pause.sh STOP|CONT: pause or resume the NOS-Bench tabulation (main process and its workers)
main=$(pgrep -f "nos-gym tabulate" | head -1); [ -z "$main" ] && { echo "not running"; exit 0; }
pids="$main $(pgrep -P $main | tr '\n' ' ')"
for p in $pids; do pids="$pids $(pgrep -P $p | tr '\n' ' ')"; done
kill -$1 $pids && echo "$1: $pids"
