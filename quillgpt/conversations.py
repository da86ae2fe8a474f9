"""Conversations as training data: files of conversations in, padded batches with loss masks out.

    convs = read_conversations("chats.jsonl")               # .jsonl (one per line) or .parquet
    data = ConversationData.build(tokenizer, convs.conversations, block_size=256)
    Trainer(cfg, data=data).run()                           # the ordinary training loop

A `.jsonl` file holds one conversation per line, `{"messages": [{"role": ..., "content": ...},
...]}` (OpenAI's shape); a `.parquet` file a `messages` column of the same lists. A line that is
not such a conversation (malformed JSON, an unknown role, content that is not a string, no
assistant turn, roles out of order) stops the run with its line number, or is skipped and
counted (`skip_invalid`).

Each conversation is rendered by `chat.render` into ids and a loss mask. Inputs are ids[:-1],
targets ids[1:] where the mask is set and -1 (not scored) elsewhere. A batch is `batch_size`
whole conversations drawn at random from a seeded generator, right-padded to the longest of
them (targets -1 on the padding), so no token ever attends across two conversations and the
generator's state is all a checkpoint needs to continue exactly. (Padding against packing
with document masks is measured in benchmarks/sft_batching.py; padding was faster here.)
Conversations longer than the context are truncated (or dropped) and counted; validation holds
out whole conversations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chat import Conversation, ConversationError, Message, check_messages, render
from .errors import QuillError, lone_surrogate
from .tokenizers import Tokenizer
from .tools import tool_names

TOO_LONG = ("truncate", "drop")
# more characters than any token spans: content cut past (context + 64) tokens' worth of them
# renders the same first context + 1 tokens, and a 150 MB message costs no more than that to render
CHARS_PER_TOKEN = 1024


@dataclass
class ConversationFile:
    """The valid conversations of a file, and where and why the others were skipped."""

    conversations: list[list[Message]]
    places: list[str] = field(default_factory=list)  # where each conversation is: "line N", "row N"
    skipped: list[str] = field(default_factory=list)  # "line N: reason"

    def check_encodable(self, tokenizer: Tokenizer, path: str | Path, skip_invalid: bool = False) -> None:
        """Every conversation must encode with `tokenizer` (a char vocabulary may lack a
        character); one that does not stops with its line, or is skipped (`skip_invalid`)."""
        keep, places = [], []
        for conv, where in zip(self.conversations, self.places):
            try:
                render(tokenizer, conv)
            except QuillError as e:
                if not skip_invalid:
                    raise QuillError(f"{path} {where}: {e} (or skip such conversations with "
                                     f"--sft-skip-invalid)") from None
                self.skipped.append(f"{where}: {e}")
                continue
            keep.append(conv)
            places.append(where)
        if not keep:
            raise QuillError(f"{path}: the tokenizer encodes none of the conversations")
        self.conversations, self.places = keep, places


def _conversation(obj: Any, where: str) -> Conversation:
    """A line's conversation: its messages (and `tools`, whose names its calls must use)."""
    tools = None
    if isinstance(obj, dict) and "messages" in obj:
        obj, tools = obj["messages"], obj.get("tools")
    elif isinstance(obj, dict):
        raise ConversationError(f"{where}: no \"messages\" field")
    try:
        conv = check_messages(obj, for_training=True, tools=tools)
        defined = set(tool_names(conv.tools))
        for i, m in enumerate(conv):
            for call in m.tool_calls or []:
                if conv.tools is not None and call.name not in defined:
                    raise ConversationError(f"message {i}: calls {call.name!r}, which the line's tools do not "
                                            f"define ({', '.join(sorted(defined)) or 'none'})")
        return conv
    except ConversationError as e:
        raise ConversationError(f"{where}: {e}") from None


def _jsonl_conversations(path: Path) -> tuple[list[Any], list[str]]:
    """(parsed conversation or ConversationError, its place) for every non-blank line."""
    items, places = [], []
    try:
        f = open(path, "rb")  # noqa: SIM115 - lines decoded one by one: an error names its line
    except FileNotFoundError:
        raise QuillError(f"conversation file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QuillError(f"{path} line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                obj = json.loads(line)
                if (bad := lone_surrogate(obj)) is not None:
                    raise ConversationError(f"{where}: holds a lone surrogate ({bad}), which is not valid Unicode")
                items.append(_conversation(obj, where))
            except (ValueError, RecursionError) as e:
                items.append(ConversationError(f"{where}: not valid JSON ({e})"))
            except ConversationError as e:
                items.append(e)
            places.append(where)
    return items, places


def _parquet_conversations(path: Path) -> tuple[list[Any], list[str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QuillError(f"reading {path} needs pyarrow: pip install 'quillgpt[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
        if "messages" not in pf.schema_arrow.names:
            raise QuillError(f"{path} has no messages column (columns: {', '.join(pf.schema_arrow.names)})")
        rows = pf.read(columns=["messages"]).column("messages").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise QuillError(f"{path} is not a readable Parquet file ({e})") from None
    items: list[Any] = []
    places = [f"row {i}" for i in range(len(rows))]
    for where, row in zip(places, rows):
        try:
            items.append(_conversation(row, where))
        except ConversationError as e:
            items.append(e)
    return items, places


def read_conversations(path: str | Path, skip_invalid: bool = False) -> ConversationFile:
    """The conversations of a `.jsonl` or `.parquet` file (module docstring). A bad one is a
    QuillError naming its line (or row), unless `skip_invalid`: then it is left out and listed."""
    path = Path(path)
    if path.is_dir():
        raise QuillError(f"{path} is a directory; pass a .jsonl or .parquet file of conversations")
    if path.suffix == ".parquet":
        items, places = _parquet_conversations(path)
    elif path.suffix in (".jsonl", ".json"):
        items, places = _jsonl_conversations(path)
    else:
        raise QuillError(f"{path}: conversations come in a .jsonl file (one {{\"messages\": [...]}} per "
                         f"line) or a .parquet file with a messages column")
    out = ConversationFile([])
    for item, where in zip(items, places):
        if isinstance(item, ConversationError):
            if not skip_invalid:
                raise QuillError(f"{path} {item} (or skip such conversations with --sft-skip-invalid)")
            out.skipped.append(str(item))
        else:
            out.conversations.append(item)
            out.places.append(where)
    if not out.conversations:
        raise QuillError(f"{path} holds no valid conversation")
    return out


# --- rendering and batches --------------------------------------------------------------------

def capped(conv: list[Message], block_size: int) -> list[Message]:
    """`conv` with its content cut where no context of `block_size` tokens reaches (see
    CHARS_PER_TOKEN), and the messages after the cut dropped: what training can see of it,
    rendered at a bounded cost."""
    budget, total = (block_size + 64) * CHARS_PER_TOKEN, 0
    for i, m in enumerate(conv):
        n = len(m.content or "")
        if total + n > budget:
            return Conversation([*conv[:i], replace(m, content=(m.content or "")[: budget - total])],
                                getattr(conv, "tools", None))
        total += n
    return conv


@dataclass
class Rows:
    """Rendered conversations, each as (inputs, targets) int64 arrays of equal length."""

    inputs: list[np.ndarray]
    targets: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.inputs)

    def scored(self) -> int:
        return int(sum((t >= 0).sum() for t in self.targets))


@dataclass
class RenderStats:
    truncated: int = 0
    dropped: int = 0


def render_rows(tokenizer: Tokenizer, conversations: list[list[Message]], block_size: int,
                too_long: str, stats: RenderStats, whole: list[list[Message]] | None = None) -> Rows:
    """Each conversation's inputs and targets (targets -1 where nothing is learnt). One longer
    than block_size + 1 tokens is truncated or dropped (`too_long`), as is a truncated one with
    nothing left to learn; `stats` counts them. `whole` gets the conversations that fit uncut."""
    if too_long not in TOO_LONG:
        raise QuillError(f"sft_too_long must be truncate or drop, got {too_long!r}")
    rows = Rows([], [])
    for conv in conversations:
        r = render(tokenizer, capped(conv, block_size))
        ids, mask = np.asarray(r.ids, dtype=np.int64), np.asarray(r.mask, dtype=bool)
        cut = len(ids) > block_size + 1
        if cut and too_long == "drop":
            stats.dropped += 1
            continue
        ids, mask = ids[: block_size + 1], mask[: block_size + 1]
        targets = np.where(mask[1:], ids[1:], -1)
        if not (targets >= 0).any():
            stats.dropped += 1  # truncated before the assistant spoke
            continue
        stats.truncated += cut
        if whole is not None and not cut:
            whole.append(conv)
        rows.inputs.append(ids[:-1])
        rows.targets.append(targets)
    return rows


class ConversationBatches:
    """Batches of whole conversations, right-padded to the longest of each batch.

    Like `data.BatchSampler`: each step the seeded generator draws `world_size * batch_size`
    conversations and rank r keeps the r-th slice, so under DDP the ranks never share a draw
    and any rank's generator state resumes them all."""

    def __init__(self, rows: Rows, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        if not len(rows):
            raise QuillError("no conversations to draw batches from")
        self.rows = rows
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (padding: 0) and targets (padding: -1), each (batch_size, longest)."""
        picks = torch.randint(len(self.rows), (self.world_size * self.batch_size,), generator=self.generator)
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        T = max(len(self.rows.inputs[i]) for i in mine)
        x = np.zeros((len(mine), T), dtype=np.int64)
        y = np.full((len(mine), T), -1, dtype=np.int64)
        for b, i in enumerate(mine):
            n = len(self.rows.inputs[i])
            x[b, :n], y[b, :n] = self.rows.inputs[i], self.rows.targets[i]
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def split_conversations(conversations: list[list[Message]], val_fraction: float
                        ) -> tuple[list[list[Message]], list[list[Message]]]:
    """(train, val): whole conversations, the val ones drawn by a fixed seed (the split does not
    depend on the run's seed), at least one on each side."""
    n = len(conversations)
    if n < 2:
        raise QuillError(f"{n} conversation: training needs at least 2 (one is held out for validation)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng(0).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(conversations) if i not in val_idx]
    val = [c for i, c in enumerate(conversations) if i in val_idx]
    return train, val


@dataclass
class ConversationData:
    """Conversations as a `data.TrainingData`: what `Trainer(cfg, data=...)` trains on."""

    tokenizer: Tokenizer
    train: Rows
    val: Rows
    val_conversations: list[list[Message]]  # the held-out ones that fit the context whole
    stats: RenderStats
    skipped: int = 0

    @classmethod
    def build(cls, tokenizer: Tokenizer, conversations: list[list[Message]], block_size: int,
              val_fraction: float = 0.1, too_long: str = "truncate", skipped: int = 0) -> ConversationData:
        """Split, render and check the conversations (with a tokenizer that has the chat tokens)."""
        train_c, val_c = split_conversations(conversations, val_fraction)
        stats, val_whole = RenderStats(), []
        train = render_rows(tokenizer, train_c, block_size, too_long, stats)
        val = render_rows(tokenizer, val_c, block_size, too_long, stats, whole=val_whole)
        if not len(train) or not len(val):
            raise QuillError(f"no conversation fits the context of {block_size} tokens with something "
                             f"left to learn in the {'training' if not len(train) else 'validation'} split; "
                             f"raise --block-size")
        return cls(tokenizer, train, val, val_whole, stats, skipped)

    def describe(self) -> str:
        notes = [f"{n} {what}" for n, what in ((self.stats.truncated, "truncated"),
                                                (self.stats.dropped, "dropped as too long"),
                                                (self.skipped, "skipped as invalid")) if n]
        return (f"{len(self.train):,} train / {len(self.val):,} val conversations "
                f"({self.train.scored():,} tokens learnt from){'; ' + ', '.join(notes) if notes else ''}")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for rows in (self.train, self.val):
            h.update(f"{len(rows)}".encode())
            for x, y in zip(rows.inputs, rows.targets):
                h.update(x.tobytes())
                h.update(y.tobytes())
        return h.hexdigest()

    def batches(self, split: str, batch_size: int, seed: int, device: torch.device,
                rank: int = 0, world_size: int = 1) -> ConversationBatches:
        rows = self.train if split == "train" else self.val
        return ConversationBatches(rows, batch_size, seed, device, rank, world_size)


def log_skipped(skipped: list[str], log: Callable[[str], None], shown: int = 3) -> None:
    if skipped:
        more = f" (and {len(skipped) - shown} more)" if len(skipped) > shown else ""
        log(f"skipped {len(skipped)} invalid conversation{'s' if len(skipped) != 1 else ''}: "
            f"{'; '.join(skipped[:shown])}{more}")
