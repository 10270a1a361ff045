#!/usr/bin/env python3
"""Chooses the few inputs of a long fuzz run worth committing as seeds.

    fuzz/pick-corpus.py TARGET [LIMIT]      (after scripts/fuzz.sh; default LIMIT 24)

Runs the built target with libFuzzer's merge over fuzz/corpus/TARGET (the seeds) and
fuzz/corpus-run/TARGET (what the run found), counting coverage edges only (-use_counters=0),
then greedily picks up to LIMIT found inputs that each add the most edges not yet covered by the
seeds and the inputs picked before, and copies them to fuzz/corpus/TARGET/found-<sha1>. A full
`cargo fuzz cmin` keeps every input with a new feature, far more files than belong in git."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LEN = {"log_reader": 1048576, "peer_frame": 65536, "nbd_reply": 65536}


def main():
    target = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    binary = os.path.join(HERE, "target/x86_64-unknown-linux-gnu/release", target)
    seeds = os.path.join(HERE, "corpus", target)
    found = os.path.join(HERE, "corpus-run", target)
    tmp = tempfile.mkdtemp()
    try:
        ctl = os.path.join(tmp, "control")
        # The seeds go first, as the corpus merged into: libFuzzer credits each input only
        # with the edges no input before it reached, seeds first, then the rest smallest first.
        out = os.path.join(tmp, "seeds")
        shutil.copytree(seeds, out)
        subprocess.run([binary, "-merge=1", "-use_counters=0", f"-merge_control_file={ctl}",
                        f"-max_len={MAX_LEN.get(target, 16384)}", "-rss_limit_mb=2048",
                        out, found],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = open(ctl).read().split("\n")
    finally:
        shutil.rmtree(tmp)
    n = int(lines[0])
    files = lines[2:2 + n]
    cov = {}
    for line in lines[2 + n:]:
        parts = line.split()
        if parts and parts[0] == "COV":
            cov[int(parts[1])] = set(parts[2:])
    is_seed = [os.path.dirname(os.path.abspath(f)) == os.path.abspath(out) for f in files]
    have = set().union(*(cov.get(i, set()) for i in range(n) if is_seed[i]))
    seed_edges = len(have)
    candidates = [i for i in range(n) if not is_seed[i]]
    picked = []
    while len(picked) < limit and candidates:
        best = max(candidates,
                   key=lambda i: (len(cov.get(i, set()) - have), -os.path.getsize(files[i])))
        if not cov.get(best, set()) - have:
            break
        have |= cov[best]
        picked.append(best)
        candidates.remove(best)
    for i in picked:
        data = open(files[i], "rb").read()
        name = "found-" + hashlib.sha1(data).hexdigest()[:12]
        shutil.copy(files[i], os.path.join(seeds, name))
    every = set().union(*cov.values()) if cov else set()
    print(f"{target}: seeds cover {seed_edges} edges; with {len(picked)} picked inputs "
          f"{len(have)} of the {len(every)} edges of seeds and run corpus together")


if __name__ == "__main__":
    main()
