"""Peak memory of a command and every process it starts (Ray's GCS, raylet, workers, actors).

A background thread walks /proc every `interval` seconds, sums the resident set (VmRSS) and the
proportional set (Pss, shared pages such as Ray's object store split between the processes that
map them) over the command's process tree, and keeps the peaks. RSS sums count shared pages once
per process, so they overstate the true footprint; PSS sums do not.
"""

import json
import os
import subprocess
import threading
import time


def _children_map():
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(root):
    children, tree, pending = _children_map(), [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def _field_kb(path, field):
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_kb(root):
    """(RSS sum, PSS sum, process count) of `root` and its descendants, in KiB."""
    pids = process_tree(root)
    rss = sum(_field_kb(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    pss = sum(_field_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    return rss, pss, len(pids)


class TreeSampler(threading.Thread):
    def __init__(self, root, interval=0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss_kb = self.peak_pss_kb = self.max_processes = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            rss, pss, count = tree_memory_kb(self.root)
            self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
            self.max_processes = max(self.max_processes, count)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def run_sampled(command, log_path, env=None):
    """Run `command`, sampling its process tree; returns its peaks, seconds and JSON summary line."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(process.pid)
        sampler.start()
        try:
            returncode = process.wait()
        finally:
            sampler.stop()
            if process.poll() is None:  # interrupted: leave no Ray behind
                process.kill()
        seconds = time.perf_counter() - started
    with open(log_path) as log:
        # The job prints its summary as one JSON object, but Ray may log a worker's line after it.
        summaries = [line for line in log if line.startswith('{"ok"')]
    return {
        "returncode": returncode,
        "seconds": seconds,
        "peak_rss_mb": sampler.peak_rss_kb / 1024,
        "peak_pss_mb": sampler.peak_pss_kb / 1024,
        "max_processes": sampler.max_processes,
        "summary": json.loads(summaries[-1]) if summaries else {},
    }
