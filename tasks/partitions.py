"""Hash-partitioned numeric columns that spill to scratch files over a memory budget.

Why: a stage that must see every event at once (exactly-once over all ids, abuse filters over
all of a user's events) would otherwise hold per-event state that grows with the data. Rows go
into K partitions by a hash's top bits, so one partition holds every row of its keys; later
steps then work one partition at a time. While the partitions together fit the budget they
stay in memory (fast path); past it the biggest ones are written to Arrow IPC files in scratch
space and read back through a memory map when their turn comes, so memory stays bounded
whatever the number of rows.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa


def partition_count(expected_rows: int, rows_per_partition: int, minimum: int = 16, maximum: int = 4096) -> int:
    """A power of two: enough partitions for `rows_per_partition` each (at least `minimum`)."""
    need = max(1, -(-int(expected_rows) // max(1, rows_per_partition)))
    return int(min(maximum, max(minimum, 1 << (need - 1).bit_length())))


def split_by_hash(h: np.ndarray, k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(row order grouping the rows by partition, partition boundaries into it); k a power of
    two, the partition is the hash's top bits. The order is stable (arrival order within each
    partition) and None when k == 1."""
    if k == 1:
        return None, np.array([0, len(h)])
    part = (h >> np.uint64(64 - (k.bit_length() - 1))).astype(np.uint16 if k <= 1 << 16 else np.int64)
    order = np.argsort(part, kind="stable")  # small integers: numpy uses a radix sort
    return order, np.searchsorted(part[order], np.arange(k + 1))


class Budget:
    """Bytes held in memory by a group of `Partitions`; spills when over the limit."""

    def __init__(self, limit_bytes: int, scratch: Path | None = None) -> None:
        self.limit = int(limit_bytes)
        self.used = 0
        self.spilled_bytes = 0
        self.lock = threading.RLock()
        self.members: list[Partitions] = []
        self._scratch = scratch
        self._folder: Path | None = None

    def folder(self) -> Path:
        if self._folder is None:
            base = self._scratch or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="spill-", dir=base))
        return self._folder

    def _relieve(self) -> None:
        """Spill the biggest in-memory partitions until half the limit is in use (hysteresis:
        one spill makes room for many appends)."""
        if self.used <= self.limit:
            return
        while self.used > self.limit // 2:
            best = max(((m.mem_bytes[p], m, p) for m in self.members for p in range(m.k)),
                       key=lambda x: x[0], default=(0, None, 0))
            if best[1] is None or best[0] == 0:
                return
            best[1]._spill(best[2])

    def close(self) -> None:
        """Remove the spill files."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class Partitions:
    """K partitions of rows with fixed columns (name -> numpy dtype). Chunks are appended
    whole per partition, in arrival order; `take` returns a partition's rows in that order."""

    def __init__(self, k: int, columns: dict[str, np.dtype | type], budget: Budget) -> None:
        self.k = k
        self.columns = {c: np.dtype(d) for c, d in columns.items()}
        self.budget = budget
        self.mem: list[list[dict[str, np.ndarray]]] = [[] for _ in range(k)]
        self.mem_bytes = [0] * k
        self.files: list[list[Path]] = [[] for _ in range(k)]
        self._schema = pa.schema([(c, pa.from_numpy_dtype(np.uint8 if d == np.bool_ else d))
                                  for c, d in self.columns.items()])
        with budget.lock:
            budget.members.append(self)

    def append(self, p: int, cols: dict[str, np.ndarray]) -> None:
        """Add rows to partition p (the arrays are kept, not copied: pass arrays of their own,
        not views into a bigger one, or spilling frees nothing)."""
        n = len(next(iter(cols.values())))
        if n == 0:
            return
        size = sum(a.nbytes for a in cols.values())
        with self.budget.lock:
            self.mem[p].append(cols)
            self.mem_bytes[p] += size
            self.budget.used += size
            self.budget._relieve()

    def split(self, h: np.ndarray, cols: dict[str, np.ndarray], rows: np.ndarray | None = None,
              index: str | None = None) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Rows grouped by the partitions of their hashes `h`, as (partition, columns) pieces
        to `append`, arrival order kept. `rows`: only these rows (indices into the columns);
        `index`: also a column of that name with each row's index. One gather per column and
        partition, straight from the given columns; needs no lock, so threads can split."""
        order, bounds = split_by_hash(h if rows is None else h[rows], self.k)
        take = rows if order is None else (order if rows is None else rows[order])
        pieces = []
        for p in range(self.k):
            a, b = int(bounds[p]), int(bounds[p + 1])
            if b > a:
                at = np.arange(len(h)) if take is None else take[a:b]  # arrays of their own
                piece = {c: v if take is None else v[at] for c, v in cols.items()}
                if index:
                    piece[index] = at.astype(np.int64, copy=False)
                pieces.append((p, piece))
        return pieces

    def _spill(self, p: int) -> None:
        """Write partition p's in-memory chunks to one IPC file (called under the lock)."""
        chunks = self.mem[p]
        cols = {c: np.concatenate([ch[c] for ch in chunks]) if len(chunks) > 1 else chunks[0][c]
                for c in self.columns}
        path = self.budget.folder() / f"{uuid.uuid4().hex}.arrow"
        batch = pa.record_batch([pa.array(v.view(np.uint8) if v.dtype == np.bool_ else v) for v in cols.values()],
                                schema=self._schema)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self._schema) as w:
            w.write_batch(batch)
        self.files[p].append(path)
        self.budget.used -= self.mem_bytes[p]
        self.budget.spilled_bytes += self.mem_bytes[p]
        self.mem[p], self.mem_bytes[p] = [], 0

    def _gather(self, p: int) -> dict[str, np.ndarray]:
        with self.budget.lock:
            files, chunks = list(self.files[p]), list(self.mem[p])
        pieces: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        maps = []
        for path in files:  # spilled chunks came first
            mm = pa.memory_map(str(path))
            maps.append(mm)
            b = pa.ipc.open_file(mm).get_batch(0)
            for i, (c, d) in enumerate(self.columns.items()):
                v = b.column(i).to_numpy()
                pieces[c].append(v.view(np.bool_) if d == np.bool_ else v)
        for ch in chunks:
            for c in self.columns:
                pieces[c].append(ch[c])
        out = {c: (np.concatenate(v) if len(v) != 1 or maps else v[0]) if v else np.zeros(0, self.columns[c])
               for c, v in pieces.items()}
        for mm in maps:
            mm.close()
        return out

    def read(self, p: int) -> dict[str, np.ndarray]:
        """Partition p's rows, in arrival order (it stays stored: the arrays may be the stored
        ones, so do not modify them)."""
        return self._gather(p)

    def take(self, p: int) -> dict[str, np.ndarray]:
        """Partition p's rows, in arrival order, and forget them (memory and files). Call it
        once the appends are done: rows appended meanwhile would be forgotten too."""
        out = self._gather(p)
        with self.budget.lock:
            for path in self.files[p]:
                path.unlink(missing_ok=True)
            self.files[p] = []
            self.budget.used -= self.mem_bytes[p]
            self.mem[p], self.mem_bytes[p] = [], 0
        return out


def release_memory() -> None:
    """Hand freed memory back to the OS between phases: Arrow's pool keeps freed pages for
    reuse, and glibc keeps freed blocks in its per-thread arenas, so a phase's temporaries
    would otherwise stay in the process's RSS while the next phase allocates its own."""
    pa.default_memory_pool().release_unused()
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
