"""Process churn for the side-by-side benchmark: IDLE sleeping processes, and RATE short execs a second.

Usage: python3 exec_churn.py IDLE RATE

The idle processes (`sleep`) are what a busy host's long tail of daemons looks like to a profiler: each
is one more process to discover, few samples. The churn execs `/bin/true` on a fixed schedule (not
back to back, so the rate is the one asked for on a loaded host too, unless one exec takes longer than
a period) and reaps it. Runs until killed; the idle processes die with it (their process group).
"""

import os
import subprocess
import sys
import time


def main() -> None:
    idle, rate = int(sys.argv[1]), float(sys.argv[2])
    os.setpgrp()  # the bench kills the whole group: this process, the sleepers and any exec in flight
    sleepers = [subprocess.Popen(["sleep", "infinity"]) for _ in range(idle)]
    print(f"ready {len(sleepers)}", flush=True)
    period, due = 1.0 / rate, time.monotonic()
    while True:
        os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)
        due += period
        time.sleep(max(0.0, due - time.monotonic()))


if __name__ == "__main__":
    main()
