"""The teacher's top-k logits, computed once and read by many recoveries.

Minitron (arXiv 2407.14679) distils from a frozen teacher; its forward pass is a third of
a recovery step's FLOPs. A cache of the teacher's top-k logits per token pays it once and
serves every student with the same tokenizer (as DistillKit's offline mode does).
``minicompress teacher-cache`` writes one; ``recover(teacher_cache=...)`` reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import MinicompressError

log = logging.getLogger(__name__)

CACHE_INDEX_FILE = "teacher_cache.json"
CACHE_FORMAT = "minicompress-teacher-cache"


class TeacherCache:
    """Read access to a folder written by :func:`write_teacher_cache`.

    Attributes:
        folder: the cache folder.
        index: the parsed ``teacher_cache.json``.
        input_ids: ``[R, L]`` int64 token ids of every cached row, in order.
        seq_len: ``L``.
        kind: ``topk`` (the teacher's top-k logits) or ``sampled`` (tokens drawn from the
            teacher's distribution and their log-probs).
        top_k: ``k``, the entries per position of either kind.
        vocab_size: the teacher's vocabulary size.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder).expanduser()
        index_path = self.folder / CACHE_INDEX_FILE
        if not index_path.is_file():
            raise MinicompressError(f"--teacher-cache: {self.folder} has no {CACHE_INDEX_FILE}; "
                                    "write one with minicompress teacher-cache")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != CACHE_FORMAT:
            raise MinicompressError(f"--teacher-cache: {index_path} is not a {CACHE_FORMAT} index")
        self.seq_len = int(self.index["seq_len"])
        self.top_k = int(self.index["top_k"])
        self.kind = self.index.get("kind", "topk")
        self._names = ("topk_values", "topk_indices") if self.kind == "topk" else \
            ("sample_logprobs", "sample_indices")
        self.vocab_size = int(self.index["vocab_size"])
        self._handles, self._starts = [], []
        ids = []
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise MinicompressError(f"--teacher-cache: shard {path} is missing")
            handle = safe_open(str(path), framework="pt")
            self._handles.append(handle)
            self._starts.append(int(shard["start"]))
            ids.append(handle.get_tensor("input_ids").long())
        self.input_ids = torch.cat(ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def topk(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached entries of some rows: ``(values [B, L, k]`` in the stored dtype, ``indices
        [B, L, k]`` int64): top-k logits (``kind="topk"``) or sampled tokens' log-probs.

        Args:
            rows: ``[B]`` row indices into the cache.
        """
        values, indices = [], []
        for row in rows.tolist():
            shard = max(i for i, start in enumerate(self._starts) if start <= row)
            local = row - self._starts[shard]
            handle = self._handles[shard]
            values.append(handle.get_slice(self._names[0])[local:local + 1])
            indices.append(handle.get_slice(self._names[1])[local:local + 1])
        return torch.cat(values), torch.cat(indices).long()

    def targets(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(values, indices, loss kind)`` of some rows for
        :func:`minicompress.distillation.losses.chunked_distill_loss`: ``topk_kl`` or ``sampled_kl``."""
        values, indices = self.topk(rows)
        return values, indices, "topk_kl" if self.kind == "topk" else "sampled_kl"


