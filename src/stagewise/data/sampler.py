"""Batches of (x, y) windows cut from a token stream, resumable to the exact next batch.

Window i is tokens[i*T : i*T + T + 1] (x is its first T tokens, y its last T), so windows do
not overlap and an epoch sees every training token once (bar the tail that fills no window).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stagewise.data.token_shards import Tokens


class WindowSampler:
    def __init__(self, tokens: Tokens, block_size: int, batch_size: int, seed: int,
                 shuffle: bool = True) -> None:
        self.windows_per_epoch = (len(tokens) - 1) // block_size
        if self.windows_per_epoch < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of block_size + 1 = "
                             f"{block_size + 1} tokens")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # windows of this epoch already handed out
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows; an epoch that runs out mid-batch is continued by the next."""
        return self._gather(self._take(self.batch_size, stop_at_epoch_end=False))

    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch, batch by batch (the last may be smaller); the epoch
        has advanced by the time its last batch is yielded."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self._gather(self._take(self.batch_size, stop_at_epoch_end=True))

    def skip(self, batches: int) -> None:
        """Pass over the next `batches` batches without reading them."""
        self.skip_windows(batches * self.batch_size)

    def next_windows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `count` windows (a batch of another size: a mixture's share of one)."""
        return self._gather(self._take(count, stop_at_epoch_end=False))

    def skip_windows(self, count: int) -> None:
        if count > 0:
            self._take(count, stop_at_epoch_end=False)

    def iter_eval(self, max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first windows in order, the same batches every call; the training position is
        left alone. None: every window."""
        batches = -(-self.windows_per_epoch // self.batch_size)
        for b in range(batches if max_batches is None else min(batches, max_batches)):
            stop = min((b + 1) * self.batch_size, self.windows_per_epoch)
            yield self._gather(np.arange(b * self.batch_size, stop))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The position only means the same thing over the same windows in the same order.
        for key in ("seed", "windows_per_epoch"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler "
                                 f"{getattr(self, key)}: not the same data or seed")
        if not 0 <= state["position"] < self.windows_per_epoch:
            raise ValueError(f"sampler position {state['position']} is outside the epoch's "
                             f"{self.windows_per_epoch} windows")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def _epoch_order(self) -> np.ndarray:
        """This epoch's window order; seeded by (seed, epoch) so any epoch can be recreated."""
        if self._order_epoch != self.epoch:
            n = self.windows_per_epoch
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def _take(self, count: int, stop_at_epoch_end: bool) -> np.ndarray:
        """The next `count` window indices, advancing epoch and position."""
        parts = []
        while count > 0:
            part = self._epoch_order()[self.position:self.position + count]
            parts.append(part)
            count -= len(part)
            self.position += len(part)
            if self.position == self.windows_per_epoch:
                self.epoch += 1
                self.position = 0
                if stop_at_epoch_end:
                    break
        return np.concatenate(parts)

    def _gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of the windows, by one fancy index (a memmap reads only those rows; shards are read
        as one array, so a window across a shard boundary is the same)."""
        starts = windows * self.block_size
        rows = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        ids = torch.from_numpy(rows.astype(np.int64))
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
