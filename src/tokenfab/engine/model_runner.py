"""Turns a scheduled step (sequences and token counts) into tensors, runs the model, and returns logits."""

from __future__ import annotations

import numpy as np
import torch

from tokenfab.engine.model import AttnGroup, LlamaModel, StepBatch
from tokenfab.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = model.allocate_kv(num_blocks * block_size)
        self.device = model.device
        self._offsets = np.arange(block_size, dtype=np.int64)

    def _slots(self, seq: Sequence, upto: int) -> np.ndarray:
        bt = np.asarray(seq.block_table, dtype=np.int64)
        return (bt[:, None] * self.block_size + self._offsets[None, :]).ravel()[:upto]

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the scheduled tokens; return logits for the sequences that completed their input."""
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        dec: list[tuple[int, Sequence, int]] = []
        prefills = []
        row = 0
        dev = self.device
        for seq, n in scheduled:
            start = seq.num_computed
            end = start + n
            ids.extend(seq.token_ids[start:end])
            ctx = self._slots(seq, end)
            positions.append(np.arange(start, end, dtype=np.int64))
            slots.append(ctx[start:end])
            if end == len(seq):
                logits_rows.append(row + n - 1)
                sample_seqs.append(seq)
            if n == 1:
                dec.append((row, seq, end))
            elif start == 0:
                prefills.append((row, n, None, 0))
            else:
                prefills.append((row, n, torch.from_numpy(ctx).to(dev), start))
            row += n
        group = AttnGroup(None, None, None, 0, prefills, self.block_size)
        if dec:
            bs = self.block_size
            nb = max(-(-L // bs) for _, _, L in dec)
            tables = np.zeros((len(dec), nb), dtype=np.int64)  # padding points at block 0, masked below
            lens = np.empty(len(dec), dtype=np.int64)
            for i, (_, seq, L) in enumerate(dec):
                used = -(-L // bs)
                tables[i, :used] = seq.block_table[:used]
                lens[i] = L
            dec_rows = torch.tensor([r for r, _, _ in dec], device=dev)
            if self.model.use_cpu_kernels:  # the kernel reads blocks in place: tables and lengths only
                group = AttnGroup(dec_rows, None, None, nb * bs, prefills, bs,
                                  torch.from_numpy(tables), torch.from_numpy(lens))
            else:
                group = self._gathered_group(dec_rows, tables, lens, nb, prefills)
        batch = StepBatch(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            logits_rows=torch.tensor(logits_rows, device=dev, dtype=torch.long),
            attn=group,
        )
        logits = self.model.forward(batch, self.kv)
        return logits, sample_seqs

    def _gathered_group(self, dec_rows: torch.Tensor, tables: np.ndarray, lens: np.ndarray, nb: int,
                        prefills) -> AttnGroup:
        """Decode attention for the torch path: rows of whole blocks to gather, and a padding bias."""
        dev, bs = self.device, self.block_size
        # rows of the cache viewed as [2 KV heads x blocks, block size x head dim], ordered
        # (K or V, sequence, kv head, block); the cache's heads are K heads then V heads
        kvh = self.model.args.num_kv_heads
        part = np.arange(2, dtype=np.int64)[:, None, None, None] * kvh
        head = np.arange(kvh, dtype=np.int64)[None, None, :, None]
        rows = (part + head) * self.num_blocks + tables[None, :, None, :]
        lmax = nb * bs
        bias = None
        if (lens != lmax).any():
            pad = np.where(np.arange(lmax)[None, :] < lens[:, None], 0.0, -np.inf).astype(np.float32)
            bias = torch.from_numpy(pad).to(device=dev, dtype=self.model.dtype).view(len(lens), 1, 1, lmax)
        return AttnGroup(dec_rows, torch.from_numpy(rows.ravel()).to(dev), bias, lmax, prefills, bs)
