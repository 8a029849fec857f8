"""Data preparation of large corpora: wall time, tokens/s and peak memory, against a reference.

For each corpus size (a synthetic text file made by this script from the running Python's standard
library: its words, drawn by a seeded Zipf law into lines and paragraphs, so every machine makes
the same corpus) and each tokenizer (byte-level; a byte-level BPE of 8000 ids trained on the
corpus), two preparations of the whole file, each in its own process:

  stagewise   `prepare_data`, as `stagewise check/train` prepares a plan's `data.train` (a text
              file, val_fraction 0.1): the tokenizer built from the text (a BPE learns from at most
              64 MiB drawn evenly over it), both splits tokenized into the token cache by
              `data.num_proc` processes (--num-proc; default: the physical cores)
  reference   a streaming nanoGPT-style script: `tokenizers` encodes the file a batch of lines at a
              time (encode_batch_fast, as fast as that library goes), the ids go into an np.memmap;
              for BPE it trains the same kind of tokenizer on the file's first 64 MiB first

wall time, tokens/s (tokens written / wall) and the peak RSS of the process (getrusage of the
child). The two run interleaved, in alternating order. Goals: stagewise's peak RSS < 2 GB at every
size, flat in the corpus size; its tokens/s >= the reference's.

    .venv/bin/python benchmarks/data_prep.py                  # 50 MB, 500 MB and 2 GB
    .venv/bin/python benchmarks/data_prep.py --sizes 50 500   # MB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.data.cores import physical_cores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_prep.json"
VOCAB = 8000
SAMPLE_BYTES = 64 << 20


def make_corpus(path: Path, megabytes: int) -> None:
    """`megabytes` MB of English-like text from the standard library's words: a 16 MB block of
    seeded Zipf draws, written again with its paragraphs in another seeded order until the size."""
    words = sorted(set(re.findall(r"[A-Za-z]{2,12}", "".join(
        p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))))))
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.2, size=3_000_000), len(words)) - 1
    order = rng.permutation(len(words))
    chosen = [words[order[r]] for r in ranks]
    paragraphs, i = [], 0
    while i < len(chosen):
        n = int(rng.integers(40, 200))
        sentence = " ".join(chosen[i:i + n])
        paragraphs.append(sentence[:1].upper() + sentence[1:] + ".\n\n")
        i += n
    target = megabytes * 1_000_000
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for j in rng.permutation(len(paragraphs)):
                f.write(paragraphs[j])
                written += len(paragraphs[j])
                if written >= target:
                    break


STAGEWISE = """
import json, sys, time
from pathlib import Path
from stagewise.data.prepared_data import prepare_data
from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import TokenizerConfig
path, kind, cache, num_proc = sys.argv[1:5]
tok = {"kind": "byte"} if kind == "byte" else {"kind": "bpe", "vocab_size": int(kind.removeprefix("bpe"))}
start = time.perf_counter()
p = prepare_data(DataConfig(train=path, num_proc=int(num_proc)), TokenizerConfig(**tok), Path("/"), Path(cache), seed=0)
print(json.dumps({"tokens": len(p.train) + len(p.val), "seconds": time.perf_counter() - start}))
"""

REFERENCE = """
import json, os, sys, time
from pathlib import Path
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
path, kind, out = sys.argv[1:4]
start = time.perf_counter()
vocab = 257 if kind == "byte" else int(kind.removeprefix("bpe"))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

def lines(limit=None):
    seen = 0
    with open(path, encoding="utf-8") as f:
        while limit is None or seen < limit:
            batch = f.readlines(4 << 20)
            if not batch:
                return
            seen += sum(map(len, batch))
            yield batch

tok.train_from_iterator((line for batch in lines(SAMPLE_BYTES) for line in batch), trainer=trainer)
size = Path(path).stat().st_size
ids = np.memmap(out, dtype=np.uint16, mode="w+", shape=(size + 1,))  # at most one id per byte
n = 0
for batch in lines():
    for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
        ids[n:n + len(enc.ids)] = enc.ids
        n += len(enc.ids)
ids.flush()
del ids
os.truncate(out, n * 2)
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - start}))
""".replace("SAMPLE_BYTES", str(SAMPLE_BYTES))


def sample_tree_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    """The most RSS (bytes) process `pid` and its children held at once, into peak[0], until `done`."""
    def rss(pid: int) -> int:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        own = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0)
        return own + sum(rss(int(child)) for child in children)

    while not done.is_set():
        peak[0] = max(peak[0], rss(pid))
        time.sleep(0.2)


def run(script: str, corpus: Path, kind: str, scratch: Path, num_proc: int) -> dict[str, Any]:
    """One preparation in a child process: its wall time, CPU time, tokens, tokens/s, peak RSS (MB) of the
    largest process (the child or one of its workers: getrusage) and of the child and its workers
    together (sampled every 0.2 s)."""
    load = round(os.getloadavg()[0], 1)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, str(corpus), kind, str(scratch), str(num_proc)],
                            stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    tree_peak, done = [0], threading.Event()
    sampler = threading.Thread(target=sample_tree_rss, args=(proc.pid, tree_peak, done), daemon=True)
    sampler.start()
    out = proc.stdout.read()
    done.set()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{kind} on {corpus} failed ({status})")
    result = json.loads(out)
    sampler.join()
    return {"wall_s": round(wall, 1), "tokens": result["tokens"], "tokens_per_s": round(result["tokens"] / wall),
            # CPU seconds of the process and its workers (threads included): what other processes'
            # load does not change, unlike the wall time
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_tree_rss_mb": round(tree_peak[0] / 2**20),
            "load_1min_at_start": load}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500, 2000], help="corpus sizes in MB")
    parser.add_argument("--kinds", nargs="+", default=["byte", f"bpe{VOCAB}"])
    parser.add_argument("--num-proc", type=int, default=physical_cores(),
                        help="stagewise's data.num_proc (default: the physical cores; the reference's "
                             "tokenizers uses every core)")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    table = Table("corpus", "tokenizer", "who", "wall s", "CPU s", "tokens", "tokens/s", "peak RSS MB", "with workers MB")
    with tempfile.TemporaryDirectory(prefix="data-prep-") as tmp:
        for megabytes in args.sizes:
            corpus = Path(tmp, f"corpus-{megabytes}mb.txt")
            make_corpus(corpus, megabytes)
            for i, kind in enumerate(args.kinds):
                order = ["reference", "stagewise"] if i % 2 == 0 else ["stagewise", "reference"]
                for who in order:
                    scratch = Path(tmp, f"{who}-{megabytes}-{kind}")
                    script = STAGEWISE if who == "stagewise" else REFERENCE
                    result = {"corpus_mb": megabytes, "tokenizer": kind, "who": who,
                              **run(script, corpus, kind, scratch, args.num_proc)}
                    rows.append(result)
                    report(rows, args.num_proc, argv)  # after each row: a long run stopped keeps what it measured
                    table.add_row(str(megabytes), kind, who, str(result["wall_s"]), str(result["cpu_s"]), f"{result['tokens']:,}",
                                  f"{result['tokens_per_s']:,}", str(result["peak_rss_mb"]), str(result["peak_tree_rss_mb"]))
                    Console().print(table)
                    subprocess.run(["rm", "-rf", str(scratch)], check=True)
            corpus.unlink()
    Console().print(table)


def report(rows: list[dict[str, Any]], num_proc: int, argv: list[str] | None) -> None:
    ratios = {f"{r['corpus_mb']}mb-{r['tokenizer']}": round(r["tokens_per_s"] / ref["tokens_per_s"], 2)
              for r in rows if r["who"] == "stagewise"
              for ref in rows if ref["who"] == "reference" and (ref["corpus_mb"], ref["tokenizer"]) == (r["corpus_mb"], r["tokenizer"])}
    peak = max((max(r["peak_rss_mb"], r["peak_tree_rss_mb"]) for r in rows if r["who"] == "stagewise"), default=0)
    cpu = {f"{r['corpus_mb']}mb-{r['tokenizer']}": round(ref["cpu_s"] / r["cpu_s"], 2)
           for r in rows if r["who"] == "stagewise"
           for ref in rows if ref["who"] == "reference" and (ref["corpus_mb"], ref["tokenizer"]) == (r["corpus_mb"], r["tokenizer"])}
    results = {"rows": rows, "num_proc": num_proc, "tokens_per_s_vs_reference": ratios,
               "tokens_per_cpu_s_vs_reference": cpu, "stagewise_peak_rss_mb": peak,
               "goals": {"peak_rss_under_2gb": peak < 2048,
                         "tokens_per_s_at_least_reference": bool(ratios) and min(ratios.values()) >= 1.0},
               "load_average_before": list(LOAD_BEFORE)}
    write_results(RESULTS, results, "data_prep.py", argv, tokenizers=tokenizers.__version__)


LOAD_BEFORE = tuple(round(x, 2) for x in os.getloadavg())

if __name__ == "__main__":
    main()
