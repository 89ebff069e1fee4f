#!/bin/bash
# usage: cpu_per_receipt.sh BINARY [bench args...]: runs `BINARY bench uplink ARGS --duration 12`,
# samples CPU time (utime+stime) of state, gateway, nats-server, bench between t=3s and t=11s.
BIN=$1; shift
TCK=$(getconf CLK_TCK)
TETHER_BIN=$BIN $BIN bench uplink --duration 12 "$@" > /tmp/cpr.out 2>/dev/null &
BP=$!
sleep 3
# The bench's own children only (other benches may run on a shared machine).
kid() { for p in $(pgrep -P $BP); do tr '\0' ' ' < /proc/$p/cmdline | grep -q -- "$1" && echo $p; done | head -1; }
S=$(kid " state --nats"); G=$(kid " gateway --nats"); N=$(kid "nats-server -c")
cpu() { awk '{print $14+$15}' /proc/$1/stat 2>/dev/null || echo 0; }
s0=$(cpu $S); g0=$(cpu $G); n0=$(cpu $N); b0=$(cpu $BP); t0=$(date +%s.%N)
sleep 8
s1=$(cpu $S); g1=$(cpu $G); n1=$(cpu $N); b1=$(cpu $BP); t1=$(date +%s.%N)
wait $BP
rate=$(grep "receipts =" /tmp/cpr.out | head -1 | sed 's/.*= \([0-9]*\)\/s.*/\1/')
grep -A1 "uplink \[tether\]" /tmp/cpr.out | head -2
python3 -c "
dt=$t1-$t0; r=$rate*dt; t=$TCK
for name,a,b in [('state',$s0,$s1),('gateway',$g0,$g1),('nats-server',$n0,$n1),('bench+business',$b0,$b1)]:
    print(f'{name:15s} cpu {100*(b-a)/t/dt:5.1f}%  {1e6*(b-a)/t/r:7.1f} us/receipt')
"
