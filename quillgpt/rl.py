"""`quill rl`: reinforcement learning from verifiable rewards, through the ordinary training loop.

    from quillgpt.rl import rl_config, rl_trainer
    cfg = rl_config(None, {"init_from": "runs/add-sft", "data": "prompts.jsonl", "reward": "exact",
                           "out": "runs/add-rl"})
    result = rl_trainer(cfg).run()            # a TrainResult; RUN is an ordinary chat run

What RL adds to `quill train` is its data: `RolloutData`, a `data.TrainingData` whose training
batches are the model's own replies. Each micro-batch draws `batch_size` tasks (a prompt and the
fields its reward reads), samples `rl_group_size` replies to each with the decode engine
(`rollout`: all rows batched, KV-cached), scores them (`rewards.Reward`) and returns
`(x, y, extra)`: the prompt and reply tokens, targets on the reply tokens only (the end token
included), and per row the advantage. The loop's per-token loss hook (`RolloutData.token_loss`)
turns the per-token NLL into the loss, token-normalised REINFORCE with group-relative
advantages (docs/rl.md):

    A_i = r_i - mean(r of i's group)                    (/ std of the group: rl_std_advantage)
    L   = -(1/N) sum_i sum_t A_i log p(y_it)            N: reply tokens of the micro-batch
        + beta (1/N) sum_i sum_t (exp(d_it) - d_it - 1),  d_it = log p_ref(y_it) - log p(y_it)

(the KL term only with rl_kl = beta > 0, p_ref the starting model). With rl_updates = E > 1 a
rollout batch serves E optimizer steps and the policy term becomes PPO's clipped one,
-(1/N) sum min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = p / p_old, p_old the model that
sampled (its log-probs are those of the batch's first update, where rho = 1 exactly).

Everything else is the loop's own: progress bar, metrics.csv (with the rollouts' mean reward,
share of groups with signal and reply length, and held-out pass@1 / pass@k from `PassAtK`),
loss.png, checkpoints and exact resume (the rollout source's state: its task generator, how
many tasks it has drawn, the batch in use), bf16, DDP/FSDP, the time budget.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as qdist
from .chat import ConversationError, Message, chat_token_ids, check_messages, end_ids, render
from .config import RL_DEFAULTS, Config, TrainConfig, load_config
from .conversations import ConversationBatches, Rows
from .engine import Request, complete
from .errors import QuillError, shown
from .hf import resolve_init_run
from .rewards import PASS, Reward, parse_reward
from .sampling import Sampling
from .tokenizers import Tokenizer, load_tokenizer
from .train import EvalHook, Trainer, TrainResult

REFERENCE_FILE = "rl_reference.safetensors"  # the starting model, kept in RUN for the KL term
EVAL_ROWS = 256  # rows decoded together when scoring held-out tasks


# --- tasks --------------------------------------------------------------------------------------

@dataclass
class Task:
    """A prompt (messages up to the user's turn) and the other fields of its line."""

    messages: list[Message]
    fields: dict[str, Any]
    where: str  # "prompts.jsonl line 3"

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _task(obj: Any, where: str) -> Task:
    if not isinstance(obj, dict):
        raise QuillError(f"{where}: a task is a JSON object with \"messages\" (and the fields the reward reads)")
    if "messages" not in obj:
        raise QuillError(f"{where}: no \"messages\" field")
    try:
        messages = check_messages(obj["messages"], for_training=False)
    except ConversationError as e:
        raise QuillError(f"{where}: {e}") from None
    return Task(messages, {k: v for k, v in obj.items() if k != "messages"}, where)


def read_tasks(path: str | Path, reward: Reward) -> list[Task]:
    """The tasks of a .jsonl file, one per line, each checked for what `reward` needs; a bad line
    is a QuillError naming it."""
    path = Path(path)
    if path.is_dir() or path.suffix not in (".jsonl", ".json"):
        raise QuillError(f"{path}: tasks come in a .jsonl file, one {{\"messages\": [...], \"answer\": ...}} per line")
    tasks: list[Task] = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise QuillError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise QuillError(f"{where}: not valid JSON ({shown(str(e), 120)})") from None
                task = _task(obj, where)
                reward.check(task.fields, where)
                tasks.append(task)
    except FileNotFoundError:
        raise QuillError(f"task file not found: {path}") from None
    except OSError as e:
        raise QuillError(f"cannot read {path}: {e.strerror}") from None
    if not tasks:
        raise QuillError(f"{path} holds no task")
    return tasks


def split_tasks(tasks: list[Task], val_fraction: float) -> tuple[list[Task], list[Task]]:
    """(train, held out): the held-out tasks drawn with a fixed seed, at least one on each side."""
    if len(tasks) < 2:
        raise QuillError(f"{len(tasks)} task: without --eval-data, RL needs at least 2 (one is held out)")
    n_val = min(len(tasks) - 1, max(1, round(len(tasks) * val_fraction)))
    held = set(np.random.default_rng(0).permutation(len(tasks))[:n_val].tolist())
    return ([t for i, t in enumerate(tasks) if i not in held], [t for i, t in enumerate(tasks) if i in held])


# --- rollouts -----------------------------------------------------------------------------------

@dataclass
class Reply:
    ids: list[int]  # the reply's tokens, its end token included when it ended
    finished: bool  # ended with an end token (False: cut at its token limit)
    logprobs: list[float] = field(default_factory=list)  # of each token, temperature 1
    text: str = ""  # as the reward reads it: the end token and special tokens left out


def row_seed(seed: int, index: int, sample: int) -> int:
    """The sampling seed of reply `sample` to the `index`-th task drawn (any rank, any batch size)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rollout(model: nn.Module, tokenizer: Tokenizer, prompts: list[list[int]], max_new: list[int],
            end: Collection[int], temperature: float = 1.0, top_k: int | None = None,
            seeds: Sequence[int] | None = None, max_rows: int | None = None) -> list[Reply]:
    """Sample one reply to each prompt (token ids) with the decode engine, all rows together.

    Row b ends at one of `end` or after `max_new[b]` tokens and draws with its own generator,
    seeded with `seeds[b]` (temperature 0: greedy, no seeds needed): a row's reply is the one
    it would get alone. `max_rows` caps the rows decoded at once (default: all)."""
    requests = [Request(p, Sampling(max_new_tokens=n, temperature=temperature, top_k=top_k or None,
                                    seed=None if seeds is None else seeds[b], logprobs=0), end_ids=frozenset(end))
                for b, (p, n) in enumerate(zip(prompts, max_new))]
    done = complete(model, tokenizer, requests, max_rows=max_rows or max(1, len(requests)))
    return [Reply(c.ids, c.finish == "stop", [float(x) for x in c.logprobs], c.text) for c in done]


@contextlib.contextmanager
def counting_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Counts the model's forward passes in the block (`[n]`)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def even_forwards(model: nn.Module, done: int, dist: qdist.DistInfo, device: torch.device) -> None:
    """Under FSDP every forward pass gathers the weights from all ranks: a rank that decoded in
    fewer passes than another makes up the difference with passes of one token."""
    most = torch.tensor([done], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    with torch.no_grad():
        for _ in range(int(most.item()) - done):
            model(torch.zeros((1, 1), dtype=torch.long, device=device))


def advantages(rewards: torch.Tensor, std: bool) -> torch.Tensor:
    """(tasks, group) rewards -> advantages: minus the group's mean (and / its std, with `std`)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std:
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return adv


def pad_rows(prompts: list[list[int]], replies: list[Reply], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (padding 0) and targets (-1 but on the reply tokens), right-padded to the longest."""
    seqs = [p + r.ids for p, r in zip(prompts, replies)]
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        x[b, : len(s) - 1] = torch.tensor(s[:-1])
        y[b, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p):])
    return x.to(device), y.to(device)


@torch.no_grad()
def token_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y | x) per position under `model` (0 where y is -1)."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, y.clamp(min=0)[..., None])[..., 0]
    return logp.masked_fill(y < 0, 0.0)


def reinforce_loss(nll: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, kl: float = 0.0,
                   ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None,
                   clip: float = 0.2) -> torch.Tensor:
    """The loss of one micro-batch (module docstring): `nll` (B, T) the per-token NLL of the
    targets `y` (-1: not scored), `adv` (B,) each row's advantage. With `old_logp`, PPO's clipped
    ratio; with `kl` > 0, the penalty towards `ref_logp`."""
    mask = (y >= 0).to(nll.dtype)
    n = mask.sum().clamp(min=1.0)
    logp = -nll
    a = adv.to(nll.dtype)[:, None]
    if old_logp is None:
        policy = -a * logp
    else:
        ratio = torch.exp(logp - old_logp)
        policy = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    loss = (policy * mask).sum() / n
    if kl > 0:
        assert ref_logp is not None
        d = ref_logp - logp
        loss = loss + kl * ((torch.exp(d) - d - 1) * mask).sum() / n
    return loss


# --- the training data --------------------------------------------------------------------------

@dataclass
class RolloutStats:
    """What the rollouts since the last logged step looked like (summed; `means` divides)."""

    reward: float = 0.0
    replies: int = 0
    signal: int = 0  # groups whose rewards were not all equal
    groups: int = 0
    reply_tokens: int = 0

    def means(self) -> dict[str, float]:
        if not self.replies:
            return {}
        return {"rl/reward": self.reward / self.replies, "rl/signal": self.signal / self.groups,
                "rl/reply_tokens": self.reply_tokens / self.replies}


class RolloutSource:
    """The training batches: each `next()` draws `batch_size` tasks and returns the model's
    replies to them, `(x, y, extra)` (`RolloutData.rollout_batch`).

    Like `data.BatchSampler`, each draw takes `world_size * batch_size` tasks from one seeded
    generator and rank r keeps the r-th slice, and reply g to the i-th task drawn samples with
    `row_seed(seed, i, g)`: 2 ranks roll out exactly what 1 process does in 2 micro-batches. With
    rl_updates = E > 1 the micro-batches of one optimizer step are kept and served again for the
    next E - 1 steps. `state()` holds all of it (the batches in use from every rank)."""

    def __init__(self, data: RolloutData, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.device = data, batch_size, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # tasks drawn so far, by all ranks together
        self.calls = 0  # micro-batches served
        self.quiet = 0  # rollout batches in a row without signal (on any rank)
        self.round: list[list[tuple]] = [[] for _ in range(world_size)]  # kept batches, per rank
        self.stats = RolloutStats()

    def next(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        t = self.data.t
        accum = t.gradient_accumulation_steps
        micro, update = self.calls % accum, (self.calls // accum) % t.rl_updates
        self.calls += 1
        if update > 0:
            return self.round[self.rank][micro]
        tasks = self.data.train_tasks
        picks = torch.randint(len(tasks), (self.world_size * self.batch_size,), generator=self.generator)
        mine = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        first = self.drawn + self.rank * self.batch_size
        self.drawn += self.world_size * self.batch_size
        batch = self.data.rollout_batch([tasks[i] for i in mine], first, self.stats)
        self._check_signal(batch[2]["signal"])
        if t.rl_updates > 1:
            if micro == 0:
                self.round = [[] for _ in range(self.world_size)]
            for rank, kept in enumerate(self.data.gather(batch)):
                self.round[rank].append(kept)
        return batch

    def _check_signal(self, signal: torch.Tensor) -> None:
        """Stop with one line when every group's rewards were equal for rl_no_signal_steps steps."""
        t = self.data.t
        self.quiet = 0 if self.data.any_rank(bool(signal.item() > 0)) else self.quiet + 1
        limit = t.rl_no_signal_steps * t.gradient_accumulation_steps
        if limit and self.quiet >= limit:
            raise QuillError(
                f"no learning signal: for {t.rl_no_signal_steps} steps every group of {t.rl_group_size} replies "
                f"got equal rewards, so there is nothing to learn from (the last checkpoint is kept). A model "
                f"that never answers right needs more SFT first, more replies per prompt (--rl-group-size) or "
                f"a reward with partial credit; --rl-no-signal-steps 0 trains on regardless")

    def metrics(self) -> dict[str, float]:
        """The means of the rollouts since the last call (none: {})."""
        out, self.stats = self.stats.means(), RolloutStats()
        return out

    def state(self) -> dict[str, Any]:
        self.data.keep_reference()
        return {"generator": self.generator.get_state(), "drawn": self.drawn, "calls": self.calls,
                "quiet": self.quiet, "stats": vars(self.stats).copy(), "round": self.round}

    def set_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn, self.calls, self.quiet = int(state["drawn"]), int(state["calls"]), int(state["quiet"])
        self.stats = RolloutStats(**state["stats"])
        rounds = [[tuple(_to(v, self.device) for v in b) for b in kept] for kept in state["round"]]
        if len(rounds) != self.world_size:
            raise ValueError("the checkpoint was written with another number of processes")
        self.round = rounds


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


class RolloutData:
    """Tasks as a `data.TrainingData`: what `Trainer(cfg, data=...)` trains `quill rl` on.

    `batches("train", ...)` with the run's seed is the `RolloutSource` the loop trains on; the
    loss evaluations (other seeds, and "val") get batches of the tasks with their reference
    answers (`answer`) as the reply, so val_loss is the NLL of the held-out answers (without
    answers: of the held-out prompts). `bind(trainer)` gives it the model to sample from."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, reward: Reward, train_tasks: list[Task],
                 val_tasks: list[Task], block_size: int):
        self.t: TrainConfig = cfg.train
        self.tokenizer, self.reward, self.block_size = tokenizer, reward, block_size
        self.train_tasks, self.val_tasks = train_tasks, val_tasks
        self.end = end_ids(tokenizer)
        self.prompt_ids: dict[int, list[int]] = {}
        for task in train_tasks + val_tasks:
            self.prompt_ids[id(task)] = self._encode(task)
        self.source: RolloutSource | None = None
        self.model: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.reference_file: Path | None = None  # where the reference is still to be written
        self.dist = qdist.DistInfo()
        self.autocast: Any = None
        self.device = torch.device("cpu")

    def _encode(self, task: Task) -> list[int]:
        try:
            ids = render(self.tokenizer, task.messages, add_generation_prompt=True).ids
        except QuillError as e:
            raise QuillError(f"{task.where}: {e}") from None
        if len(ids) >= self.block_size:
            raise QuillError(f"{task.where}: the prompt is {len(ids)} tokens, which leaves no room for a reply in "
                             f"the model's context of {self.block_size}")
        return ids

    # the TrainingData protocol

    def describe(self) -> str:
        t = self.t
        return (f"{len(self.train_tasks):,} tasks / {len(self.val_tasks):,} held out, reward {self.reward.spec}, "
                f"{t.batch_size} prompts x {t.rl_group_size} replies per micro-batch")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for tasks in (self.train_tasks, self.val_tasks):
            h.update(f"{len(tasks)}".encode())
            for task in tasks:
                h.update(json.dumps([task.as_dicts(), task.fields], sort_keys=True, default=str).encode())
        return h.hexdigest()

    def batches(self, split: str, batch_size: int, seed: int, device: torch.device,
                rank: int = 0, world_size: int = 1) -> RolloutSource | ConversationBatches:
        if split == "train" and seed == self.t.seed:
            self.source = RolloutSource(self, batch_size, seed, device, rank, world_size)
            return self.source
        rows = self.reference_rows(self.train_tasks if split == "train" else self.val_tasks)
        return ConversationBatches(rows, batch_size, seed, device, rank, world_size)

    def token_loss(self, nll: torch.Tensor, batch: tuple) -> torch.Tensor:
        """The loop's per-token loss hook: `reinforce_loss` for rollout batches; for reference
        batches, the mean NLL of the scored tokens."""
        y = batch[1]
        if len(batch) == 2:
            return nll.sum() / (y >= 0).sum().clamp(min=1)
        extra = batch[2]
        t = self.t
        return reinforce_loss(nll, y, extra["adv"], t.rl_kl, extra.get("ref_logp"), extra.get("old_logp"),
                              t.rl_clip)

    def metrics(self) -> dict[str, float]:
        """The rollouts' mean reward, share of groups with signal and reply length since the
        last call: columns of each logged metrics row."""
        return self.source.metrics() if self.source is not None else {}

    # rollouts

    def reference_rows(self, tasks: list[Task]) -> Rows:
        """Each task as inputs and targets: its answer as the reply, or its prompt scored."""
        rows = Rows([], [])
        for task in tasks:
            if "answer" in task.fields:
                conv = task.messages + [Message("assistant", str(task.fields["answer"]))]
                r = render(self.tokenizer, conv)
                ids = np.asarray(r.ids[: self.block_size + 1], dtype=np.int64)
                targets = np.where(np.asarray(r.mask[1: self.block_size + 1]), ids[1:], -1)
            else:
                ids = np.asarray(render(self.tokenizer, task.messages).ids[: self.block_size + 1], dtype=np.int64)
                targets = ids[1:]
            rows.inputs.append(ids[:-1])
            rows.targets.append(targets)
        return rows

    def max_new(self, prompt: list[int]) -> int:
        return min(self.t.rl_max_reply_tokens, self.block_size - len(prompt))

    def sample(self, model: nn.Module, prompts: list[list[int]], temperature: float,
               seeds: Sequence[int] | None) -> list[Reply]:
        """`rollout` (in the weights' precision: the engine's cache takes no autocast); under FSDP, in
        as many forward passes on every rank."""
        with counting_forwards(model) as calls:
            replies = rollout(model, self.tokenizer, prompts, [self.max_new(p) for p in prompts], self.end,
                              temperature, self.t.rl_top_k, seeds)
        if self.dist.fsdp:
            even_forwards(model, calls[0], self.dist, self.device)
        return replies

    def rollout_batch(self, tasks: list[Task], first: int, stats: RolloutStats
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """`rl_group_size` replies to each task (the i-th drawn overall is `first + i`), scored,
        as a training batch: (x, y, {"adv", "signal", ["ref_logp"], ["old_logp"]})."""
        assert self.model is not None, "bind(trainer) first"
        t, G = self.t, self.t.rl_group_size
        prompts = [self.prompt_ids[id(task)] for task in tasks for _ in range(G)]
        seeds = [row_seed(t.seed, first + i, g) for i in range(len(tasks)) for g in range(G)]
        replies = self.sample(self.model, prompts, t.rl_temperature, seeds)
        rewards = torch.tensor([self.reward.score(task.as_dicts(), r.text, task.fields,
                                                  task.where)
                                for task, r in zip((task for task in tasks for _ in range(G)), replies)],
                               dtype=torch.float32).view(len(tasks), G)
        x, y = pad_rows(prompts, replies, self.device)
        signal = int((rewards.amax(dim=1) > rewards.amin(dim=1)).sum())
        extra = {"adv": advantages(rewards, t.rl_std_advantage).view(-1).to(self.device),
                 "signal": torch.tensor(float(signal))}
        with self.autocast:
            if t.rl_kl > 0:
                assert self.reference is not None
                extra["ref_logp"] = token_logprobs(self.reference, x, y)
            if t.rl_updates > 1:  # the policy that sampled, for PPO's ratio
                self.model.eval()
                extra["old_logp"] = token_logprobs(self.model, x, y)
                self.model.train()
        stats.reward += float(rewards.sum())
        stats.replies += len(replies)
        stats.signal += signal
        stats.groups += len(tasks)
        stats.reply_tokens += sum(len(r.ids) for r in replies)
        return x, y, extra

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tasks: list[Task]) -> dict[str, float]:
        """Held-out pass@1 (greedy) and pass@k (k samples at the rollout temperature) over the
        first rl_eval_limit tasks; a reply passes when its reward is at least 1."""
        t = self.t
        tasks = tasks[: t.rl_eval_limit]
        k = t.rl_pass_k
        greedy = self._eval_rewards(model, tasks, 1, 0.0)
        sampled = self._eval_rewards(model, tasks, k, t.rl_temperature)
        return {"rl/pass@1": float(np.mean([r[0] >= PASS for r in greedy])),
                f"rl/pass@{k}": float(np.mean([max(r) >= PASS for r in sampled]))}

    def _eval_rewards(self, model: nn.Module, tasks: list[Task], n: int, temperature: float) -> list[list[float]]:
        rows = [(i, g) for i in range(len(tasks)) for g in range(n)]
        out: list[list[float]] = [[] for _ in tasks]
        for start in range(0, len(rows), EVAL_ROWS):
            chunk = rows[start:start + EVAL_ROWS]
            prompts = [self.prompt_ids[id(tasks[i])] for i, _ in chunk]
            seeds = [row_seed(self.t.seed + 1, i, g) for i, g in chunk]
            replies = self.sample(model, prompts, temperature, seeds if temperature > 0 else None)
            for (i, _), r in zip(chunk, replies):
                task = tasks[i]
                out[i].append(self.reward.score(task.as_dicts(), r.text, task.fields,
                                                task.where))
        return out

    # the run

    def bind(self, trainer: Trainer, resume: str | Path | None) -> None:
        """Sample from `trainer`'s model, in its precision, among its ranks; with rl_kl, load the
        starting model (a fresh run: from init_from; a resumed one: the copy in RUN)."""
        self.model, self.device, self.dist = trainer.model, trainer.device, trainer.dist
        self.autocast = trainer.autocast
        if self.t.rl_kl > 0:
            self.reference = self._load_reference(trainer, resume)
            self.reference.to(self.device).eval().requires_grad_(False)

    def _load_reference(self, trainer: Trainer, resume: str | Path | None) -> nn.Module:
        from .registry import build_model

        cfg = copy.deepcopy(trainer.cfg)
        model = build_model(cfg.model)
        if resume is not None:
            path = Path(resume) / REFERENCE_FILE
            if not path.is_file():
                raise QuillError(f"--resume {resume}: {REFERENCE_FILE} (the starting model, for rl_kl) is missing")
            ckpt.load_weights(model, path)
            return model
        from .hf import grow_vocabulary, init_from

        _, state = init_from(cfg.train.init_from, cfg)
        model.load_state_dict(grow_vocabulary(state, cfg.model.vocab_size))
        if trainer.save:
            self.reference_file = trainer.out / REFERENCE_FILE
        return model

    def keep_reference(self) -> None:
        """Write the starting model into the run once (called as a checkpoint is saved)."""
        if self.reference_file is not None and self.reference is not None:
            ckpt.save_tensors(ckpt.state_dict_for_saving(self.reference), self.reference_file)
            self.reference_file = None

    def any_rank(self, flag: bool) -> bool:
        return qdist.any_rank(flag, self.dist, self.device) if self.dist.enabled else flag

    def gather(self, batch: tuple) -> list[tuple]:
        """The batch of every rank (on the CPU): what a checkpoint keeps of the batches in use."""
        cpu = tuple(_to(v, torch.device("cpu")) for v in batch)
        if not self.dist.enabled:
            return [batch]
        out: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(out, cpu)
        out[self.dist.rank] = batch
        return out


@dataclass
class PassAtK:
    """EvalHook: held-out pass@1 (greedy) and pass@k of `tasks` (RolloutData.evaluate), as
    metrics.csv columns "rl/pass@1" and "rl/pass@K" (`prefix` names another set of tasks)."""

    data: RolloutData
    tasks: list[Task]
    interval: int
    prefix: str = ""

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        found = self.data.evaluate(model, self.tasks)
        return {k.replace("rl/", f"rl/{self.prefix}"): v for k, v in found.items()}


# --- the run ------------------------------------------------------------------------------------

def rl_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """`load_config` with RL_DEFAULTS under the preset and the overrides: a key keeps the RL
    default unless the preset or `overrides` set it."""
    overrides = dict(overrides or {})
    base, plain = load_config(config, overrides), TrainConfig()
    for key, value in RL_DEFAULTS.items():
        if key not in overrides and getattr(base.train, key) == getattr(plain, key):
            overrides[key] = value
    return load_config(config, overrides)


def rl_tokenizer(cfg: Config, resume: str | Path | None) -> Tokenizer:
    """The run's tokenizer (a resumed run's own, or the source's), which must have the chat template."""
    if resume is not None:
        tokenizer = load_tokenizer(ckpt.run_file(Path(resume), ckpt.TOKENIZER_FILE))
    elif cfg.train.init_from:
        tokenizer = load_tokenizer(ckpt.run_file(resolve_init_run(cfg.train.init_from), ckpt.TOKENIZER_FILE))
    else:
        raise QuillError("quill rl improves a chat model: pass --init-from RUN (one trained with quill sft)")
    chat_token_ids(tokenizer)
    return tokenizer


def rl_data(cfg: Config, reward: Reward, resume: str | Path | None = None) -> RolloutData:
    """`cfg.train.data` (and `eval_data`) read and checked, with the run's tokenizer."""
    t = cfg.train
    if not t.data:
        raise QuillError("quill rl needs --data: a .jsonl file of tasks, one {\"messages\": [...], \"answer\": ...} "
                         "per line")
    for name, path in (("data", t.data), ("eval-data", t.eval_data)):
        if resume is not None and path and not Path(path).exists():
            raise QuillError(f"the tasks {resume} was trained on ({shown(path)}) are not on this machine: pass "
                             f"--{name} with a local copy (it is checked against the checkpoint)")
    tokenizer = rl_tokenizer(cfg, resume)
    tasks = read_tasks(t.data, reward)
    if t.eval_data:
        train_tasks, val_tasks = tasks, read_tasks(t.eval_data, reward)
    else:
        train_tasks, val_tasks = split_tasks(tasks, t.val_fraction)
    block_size = cfg.model.block_size
    if resume is None and t.init_from:
        block_size = min(block_size, ckpt.read_run_config(resolve_init_run(t.init_from)).model.block_size)
    return RolloutData(cfg, tokenizer, reward, train_tasks, val_tasks, block_size)


def rl_trainer(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
               log: Callable[[str], None] | None = None, start_time: float | None = None,
               resume: str | Path | None = None, hooks: Sequence[EvalHook] = (),
               reward: Reward | None = None, more_eval: dict[str, str | Path] | None = None) -> Trainer:
    """A `Trainer` on the tasks of `cfg.train.data` (module docstring). `reward`: the parsed
    reward; without it, `cfg.train.reward` is parsed, except python code for a resumed run, which
    the caller must name again (a run directory never brings code to run). `more_eval` names
    more held-out task files, scored as the held-out tasks are: columns "rl/NAME/pass@1", ..."""
    cfg.validate()
    t = cfg.train
    if reward is None:
        if resume is not None and t.reward.startswith("python:"):
            raise QuillError(f"{resume} was trained with a python reward, whose code runs only when you name it: "
                             f"--reward {t.reward[:400]!r}")
        reward = parse_reward(t.reward)
    elif reward.spec != t.reward:
        raise QuillError(f"the reward {shown(reward.spec)} is not the config's {shown(t.reward)}")
    data = rl_data(cfg, reward, resume)
    all_hooks = [PassAtK(data, data.val_tasks, t.eval_interval), *hooks]
    for name, path in (more_eval or {}).items():
        tasks = read_tasks(path, reward)
        for task in tasks:
            data.prompt_ids[id(task)] = data._encode(task)
        all_hooks.append(PassAtK(data, tasks, t.eval_interval, prefix=f"{name}/"))
    trainer = Trainer(cfg, overwrite=overwrite, save=save, progress=progress, log=log,
                      start_time=start_time, resume=resume, data=data, hooks=all_hooks)
    data.bind(trainer, resume)
    trainer.command = "quill rl"
    return trainer


def rl(cfg: Config, overwrite: bool = False, save: bool = True, progress: bool = True,
       resume: str | Path | None = None) -> TrainResult:
    """Train `cfg.train.init_from` with RL as `cfg` says; see `rl_trainer`."""
    return rl_trainer(cfg, overwrite=overwrite, save=save, progress=progress, resume=resume).run()


__all__ = ["PassAtK", "RL_DEFAULTS", "Reply", "RolloutData", "RolloutSource", "Task", "advantages",
           "read_tasks", "reinforce_loss", "rl", "rl_config", "rl_data", "rl_trainer", "rollout", "row_seed"]
