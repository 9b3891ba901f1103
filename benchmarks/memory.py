"""Peak memory of a benchmark worker process."""


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (VmHWM). Unlike ru_maxrss it starts afresh at exec,
    so a worker forked from a large parent doesn't report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
