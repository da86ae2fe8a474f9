"""quill rl: rewards, rollouts and the REINFORCE loss through the ordinary training loop.

The loss equals a hand-computed REINFORCE loss on a two-token toy; a reward for one token raises
that token's probability; batched rollouts sample what each prompt would alone; resume is
bitwise on CPU (after SIGKILL too); 2 DDP processes equal 1 with gradient accumulation; bad
input is one line and exit 2, and a reward that crashes mid-run leaves the last checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_run

from quillgpt import checkpoint as ckpt
from quillgpt.chat import add_chat_tokens, end_ids, render
from quillgpt.checkpoint import load_run
from quillgpt.cli import main
from quillgpt.config import ModelConfig
from quillgpt.errors import QuillError
from quillgpt.losses import token_nll
from quillgpt.resume import resume_config
from quillgpt.rewards import last_number, parse_reward
from quillgpt.rl import (
    REFERENCE_FILE,
    Reply,
    advantages,
    pad_rows,
    reinforce_loss,
    rl_config,
    rl_trainer,
    rollout,
)
from quillgpt.tokenizers.char import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = {"batch_size": 4, "rl_group_size": 4, "rl_max_reply_tokens": 6, "learning_rate": 3e-3, "min_lr": 3e-4,
        "warmup_iters": 1, "eval_interval": 4, "eval_iters": 1, "log_interval": 1, "rl_eval_limit": 4,
        "rl_pass_k": 2, "device": "cpu", "seed": 5}
LENGTH_REWARD = "def score(messages, reply, **fields):\n    return len(reply) / 6\n"


def quiet(msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise equality needs the same thread count everywhere (subprocesses: OMP_NUM_THREADS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def chat_base(tmp_path) -> Path:
    """A tiny chat model with random weights: a char vocabulary of sums and the chat tokens."""
    tok = add_chat_tokens(CharTokenizer.train("0123456789 Aadn.+="))
    return make_run(tmp_path / "base", ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24), tok)


def write_tasks(path: Path, n: int = 24, answer: bool = True) -> Path:
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        row = {"messages": [{"role": "user", "content": f"Add {a} and {b}."}]}
        if answer:
            row["answer"] = str(a + b)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tasks(tmp_path) -> Path:
    return write_tasks(tmp_path / "tasks.jsonl")


@pytest.fixture
def length_reward(tmp_path) -> str:
    (tmp_path / "reward.py").write_text(LENGTH_REWARD, encoding="utf-8")
    return f"python:{tmp_path / 'reward.py'}:score"


def cfg_for(base: Path, tasks: Path, out: Path, **extra):
    return rl_config(None, dict(TINY, init_from=str(base), data=str(tasks), out=str(out), **extra))


# --- the loss -----------------------------------------------------------------------------------

def test_loss_is_the_hand_computed_reinforce_loss_on_a_two_token_toy():
    """Two tokens, p = (1/4, 3/4) at every position. A group of two replies to one prompt: [1]
    earns 1, [0, 1] earns 0, so the advantages are +1/2 and -1/2 and over the 3 reply tokens
    L = -(1/3) (1/2 log 3/4 - 1/2 (log 1/4 + log 3/4)) = -(log 4) / 6."""
    x, y = pad_rows([[0], [0]], [Reply([1], True), Reply([0, 1], True)], torch.device("cpu"))
    assert y.tolist() == [[1, -1], [0, 1]]
    logit = torch.tensor(math.log(3.0), requires_grad=True)
    logits = torch.stack([torch.zeros(()), logit]).expand(2, 2, 2)  # log p = log 1/4, log 3/4
    adv = advantages(torch.tensor([[1.0, 0.0]]), std=False).view(-1)
    assert adv.tolist() == [0.5, -0.5]
    loss = reinforce_loss(token_nll(logits, y), y, adv)
    assert loss.item() == pytest.approx(-math.log(4) / 6, abs=1e-6)
    # d/dz of the same sum by hand, z the second logit: d log p1/dz = 1/4, d log p0/dz = -3/4
    loss.backward()
    by_hand = -(1 / 3) * (0.5 * 0.25 - 0.5 * (-0.75 + 0.25))
    assert logit.grad.item() == pytest.approx(by_hand, abs=1e-6)
    # a KL term to an identical reference adds nothing; PPO's loss at ratio 1 is -(1/3) sum A
    # (= 1/6) with REINFORCE's gradient
    old = -token_nll(logits, y).detach()
    assert reinforce_loss(token_nll(logits, y), y, adv, kl=0.5, ref_logp=old).item() == pytest.approx(loss.item())
    logit.grad = None
    ppo = reinforce_loss(token_nll(logits, y), y, adv, old_logp=old)
    ppo.backward()
    assert ppo.item() == pytest.approx(1 / 6) and logit.grad.item() == pytest.approx(by_hand, abs=1e-6)


def test_kl_term_is_the_k3_estimator_and_clipping_caps_the_ratio():
    y = torch.tensor([[1]])
    nll = torch.tensor([[0.5]])  # log p = -0.5
    ref = torch.tensor([[-1.0]])  # d = ref - log p = -0.5
    zero = torch.zeros(1)
    assert reinforce_loss(nll, y, zero, kl=2.0, ref_logp=ref).item() == pytest.approx(
        2.0 * (math.exp(-0.5) + 0.5 - 1))
    # ratio e^0.5 > 1.2 with a positive advantage: the clipped term 1.2 * A is taken
    assert reinforce_loss(nll, y, torch.ones(1), old_logp=torch.tensor([[-1.0]]), clip=0.2).item() == \
        pytest.approx(-1.2)


def test_group_advantages_mean_and_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert advantages(r, std=False).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]
    assert advantages(r, std=True)[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert advantages(r, std=True)[1].tolist() == [0.0] * 4  # no signal, no division by zero


# --- rewards ------------------------------------------------------------------------------------

def test_built_in_rewards():
    m = [{"role": "user", "content": "Add 2 and 3."}]
    exact, number, regex = parse_reward("exact"), parse_reward("number"), parse_reward(r"regex:\d+")
    assert exact.score(m, " 5\n", {"answer": "5"}, "x") == 1.0 and exact.score(m, "5.", {"answer": "5"}, "x") == 0.0
    assert number.score(m, "It is 5.0, I think", {"answer": 5}, "x") == 1.0
    assert number.score(m, "5 or 6", {"answer": "5"}, "x") == 0.0  # the last number counts
    assert last_number("about 1,000.5 units") == 1000.5 and last_number("-3") == -3 and last_number("none") is None
    assert regex.score(m, " 42 ", {}, "x") == 1.0 and regex.score(m, "42a", {}, "x") == 0.0  # a full match


# --- rollouts -----------------------------------------------------------------------------------

def test_batched_rollouts_sample_what_each_prompt_would_alone(chat_base):
    run = load_run(chat_base)
    tok = run.tokenizer
    prompts = [render(tok, [{"role": "user", "content": text}], add_generation_prompt=True).ids
               for text in ("Add 1 and 2.", "Add 3 and 4.", "1+2=")]
    end = end_ids(tok)
    batched = rollout(run.model, tok, prompts, [5, 8, 3], end, 1.0, None, [11, 12, 13])
    for p, n, seed, got in zip(prompts, [5, 8, 3], [11, 12, 13], batched):
        alone = rollout(run.model, tok, [p], [n], end, 1.0, None, [seed])[0]
        assert got.ids == alone.ids and got.finished == alone.finished and got.text == alone.text
        assert got.text == tok.decode(got.ids[:-1] if got.finished else got.ids)
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
        assert len(got.ids) <= n and (got.finished == (got.ids[-1] in end))
        # the log-probs are the model's own (temperature 1), token by token
        with torch.no_grad():
            logits, _ = run.model(torch.tensor([p + got.ids[:-1]]))
        want = torch.log_softmax(logits[0, len(p) - 1:], -1).gather(1, torch.tensor(got.ids)[:, None])[:, 0]
        assert got.logprobs == pytest.approx(want.tolist(), abs=1e-5)


# --- training -----------------------------------------------------------------------------------

def first_token_probability(model, tok, token: str) -> float:
    ids = render(tok, [{"role": "user", "content": "Add 1 and 2."}], add_generation_prompt=True).ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.softmax(logits[0, -1], -1)[tok.encode(token)[0]].item()


def test_a_reward_for_one_token_raises_its_probability(chat_base, tasks, tmp_path):
    cfg = cfg_for(chat_base, tasks, tmp_path / "rl", reward="regex:7.*", max_iters=12, rl_group_size=8,
                  learning_rate=1e-2, min_lr=1e-2, rl_no_signal_steps=0)
    trainer = rl_trainer(cfg, progress=False, log=quiet)
    before = first_token_probability(trainer.model, trainer.tokenizer, "7")
    trainer.run()
    after = first_token_probability(trainer.model, trainer.tokenizer, "7")
    assert after > 2 * before, (before, after)
    rows = trainer.metrics
    rewards = [float(r["rl/reward"]) for r in rows if r.get("rl/reward")]
    assert len(rewards) == 12 and rewards[-1] > rewards[0]


def test_rl_run_is_a_normal_chat_run_with_rl_metrics(chat_base, tasks, tmp_path, capsys):
    run = tmp_path / "rl"
    args = ["rl", "--init-from", str(chat_base), "--data", str(tasks), "--reward", "number", "--out", str(run),
            "--no-progress", "--rl-no-signal-steps", "0", "--max-iters", "4"]
    args += [a for k, v in TINY.items() for a in ("--" + k.replace("_", "-"), str(v))]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "reward number, 4 prompts x 4 replies per micro-batch" in err and "held-out pass@1" in err
    header = (run / ckpt.METRICS_FILE).read_text().splitlines()[0].split(",")
    assert {"rl/reward", "rl/signal", "rl/reply_tokens", "rl/pass@1", "rl/pass@2"} <= set(header)
    assert (run / "loss.png").is_file()
    assert main(["chat", str(run), "--message", "Add 1 and 2.", "--max-new-tokens", "4"]) == 0


def test_resume_is_bitwise_identical_with_kl_and_several_updates(chat_base, tasks, tmp_path, length_reward):
    """The checkpoint at step 3 falls inside a rollout batch's 2 updates; the KL reference is the
    run's own copy of the starting model."""
    extra = dict(reward=length_reward, rl_kl=0.1, rl_updates=2, gradient_accumulation_steps=2, lr_decay_iters=8)
    full = rl_trainer(cfg_for(chat_base, tasks, tmp_path / "full", max_iters=8, **extra), progress=False,
                      log=quiet).run()
    part = tmp_path / "part"
    rl_trainer(cfg_for(chat_base, tasks, part, max_iters=3, checkpoint_interval=3, **extra), progress=False,
               log=quiet).run()
    assert (part / REFERENCE_FILE).is_file()
    cfg = resume_config(part, overrides={"max_iters": 8, "reward": length_reward}, allow_config_change=True)
    resumed = rl_trainer(cfg, progress=False, log=quiet, resume=part, reward=parse_reward(length_reward))
    result = resumed.run()
    assert result.losses == full.losses
    a, b = ckpt.read_safetensors(part / ckpt.MODEL_FILE), ckpt.read_safetensors(tmp_path / "full" / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the rollouts' own numbers (the part run evaluated at its end, step 3, as any run does)
    rollouts = lambda rows: [[r.get(k) for k in ("step", "rl/reward", "rl/signal", "rl/reply_tokens")]  # noqa: E731
                             for r in rows]
    assert rollouts(resumed.metrics) == rollouts(ckpt.load_train_state(tmp_path / "full").state["metrics"])


def quill_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def rl_flags(base: Path, tasks: Path, out: Path, reward: str, **extra) -> list[str]:
    values = dict(TINY, init_from=str(base), data=str(tasks), out=str(out), reward=reward, **extra)
    return [a for k, v in values.items() for a in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(chat_base, tasks, tmp_path, length_reward):
    flags = rl_flags(chat_base, tasks, tmp_path / "run", length_reward, max_iters=14, checkpoint_interval=2)
    assert main(["rl", "--no-progress", *rl_flags(chat_base, tasks, tmp_path / "ref", length_reward, max_iters=14,
                                                  checkpoint_interval=2)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "quillgpt", "rl", "--no-progress", *flags], env=quill_env(),
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    while proc.poll() is None and not ckpt.list_checkpoints(tmp_path / "run"):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert ckpt.list_checkpoints(tmp_path / "run"), "the run ended before its first checkpoint"
    assert main(["rl", "--resume", str(tmp_path / "run"), "--reward", length_reward, "--no-progress"]) == 0
    a, b = ckpt.read_safetensors(tmp_path / "run" / ckpt.MODEL_FILE), \
        ckpt.read_safetensors(tmp_path / "ref" / ckpt.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert ckpt.load_train_state(tmp_path / "run").state["losses"] == \
        ckpt.load_train_state(tmp_path / "ref").state["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_accumulation(chat_base, tasks, tmp_path, length_reward, fsdp):
    ref = rl_trainer(cfg_for(chat_base, tasks, tmp_path / "ref", reward=length_reward, max_iters=4,
                             gradient_accumulation_steps=2), progress=False, log=quiet).run()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "quillgpt",
           "rl", "--no-progress", *rl_flags(chat_base, tasks, tmp_path / "ddp", length_reward, max_iters=4),
           *(["--fsdp"] if fsdp else [])]
    proc = subprocess.run(cmd, env=quill_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 processes ({'FSDP' if fsdp else 'DDP'})" in proc.stderr and proc.stderr.count("done:") == 1
    state = ckpt.load_train_state(tmp_path / "ddp")
    torch.testing.assert_close(torch.tensor(state.state["losses"]), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    a = ckpt.read_safetensors(tmp_path / "ddp" / ckpt.MODEL_FILE)
    b = ckpt.read_safetensors(tmp_path / "ref" / ckpt.MODEL_FILE)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rewards = lambda rows: [r.get("rl/reward") for r in rows]  # noqa: E731 - averaged over the ranks
    assert [float(v) for v in rewards(state.state["metrics"]) if v] == pytest.approx(
        [float(v) for v in rewards(ckpt.load_train_state(tmp_path / "ref").state["metrics"]) if v], abs=1e-5)


def test_bf16_and_time_budget(chat_base, tasks, tmp_path, capsys):
    out = tmp_path / "rl"
    args = ["rl", "--no-progress", *rl_flags(chat_base, tasks, out, "regex:.*", max_iters=10**6),
            "--dtype", "bfloat16", "--time-budget", "20s", "--rl-no-signal-steps", "0"]
    assert main(args) == 0, capsys.readouterr().err
    assert "dtype bfloat16" in capsys.readouterr().err
    assert ckpt.read_run_config(out).train.max_iters < 10**6  # fitted to the budget


# --- bad input ----------------------------------------------------------------------------------

def one_line_error(capsys, args: list[str], fragment: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def error_mid_run(capsys, args: list[str], fragment: str) -> None:
    """Exit 2 with one error line, after the lines a run says as it starts."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and err[-1].startswith("quill: error:"), err
    assert sum("error" in line for line in err) == 1


def test_bad_tasks_and_rewards_are_one_line_exit_2(chat_base, tmp_path, capsys):
    no_answer = write_tasks(tmp_path / "no_answer.jsonl", answer=False)
    good = write_tasks(tmp_path / "good.jsonl")
    base = ["rl", "--init-from", str(chat_base), "--out", str(tmp_path / "o"), "--no-progress", "--max-iters", "2"]
    one_line_error(capsys, [*base, "--data", str(no_answer)], "line 1: no \"answer\" field")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"messages": [{"role": "user", "content": "Add 1 and 2."}], "answer": "three"}) + "\n")
    one_line_error(capsys, [*base, "--data", str(text), "--reward", "number"],
                   "line 1: the answer 'three' is not a number")
    one_line_error(capsys, [*base, "--data", str(good), "--reward", "python:missing.py:score"], "no such file")
    (tmp_path / "r.py").write_text("def other(m, r, **f):\n    return 1\n")
    one_line_error(capsys, [*base, "--data", str(good), "--reward", f"python:{tmp_path / 'r.py'}:score"],
                   "has no function 'score'")
    (tmp_path / "broken.py").write_text("def score(:\n")
    one_line_error(capsys, [*base, "--data", str(good), "--reward", f"python:{tmp_path / 'broken.py'}:score"],
                   "SyntaxError")
    one_line_error(capsys, [*base, "--data", str(good), "--reward", "regex:("], "not a regular expression")
    one_line_error(capsys, [*base, "--data", str(good), "--reward", "closest"], "reward must be exact, number")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, fragment", [
    ("raise ZeroDivisionError('no')", "raised ZeroDivisionError: 'no' on "),
    ("return float('nan')", "returned nan on "),
    ("return 'good'", "returned 'good' on "),
])
def test_a_reward_that_fails_names_the_task(chat_base, tasks, tmp_path, capsys, body, fragment):
    fragment += str(tasks) + " line "
    (tmp_path / "r.py").write_text(f"def score(messages, reply, **fields):\n    {body}\n")
    args = ["rl", "--no-progress", *rl_flags(chat_base, tasks, tmp_path / "o", f"python:{tmp_path / 'r.py'}:score")]
    error_mid_run(capsys, args, fragment)


def test_a_reward_crash_mid_run_leaves_the_last_checkpoint(chat_base, tasks, tmp_path, capsys):
    """The reward's code fails at its 60th call (step 4, past the checkpoint of step 2); the run
    stops with one line, its checkpoint verifies, and it resumes once the code is fixed."""
    code = tmp_path / "r.py"
    code.write_text("calls = 0\ndef score(messages, reply, **fields):\n    global calls\n    calls += 1\n"
                    "    if calls == 60:\n        raise RuntimeError('disk on fire')\n    return len(reply) / 6\n")
    spec = f"python:{code}:score"
    run = tmp_path / "o"
    args = ["rl", "--no-progress", *rl_flags(chat_base, tasks, run, spec, max_iters=6, checkpoint_interval=2,
                                             eval_interval=100)]
    assert main(args) == 2
    assert "disk on fire" in capsys.readouterr().err
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["step-00000002"] and ckpt.verify_checkpoint(found[0]) is None
    code.write_text(LENGTH_REWARD)
    one_line_error(capsys, ["rl", "--resume", str(run), "--no-progress"], f"--reward '{spec}'")
    assert main(["rl", "--resume", str(run), "--reward", spec, "--no-progress"]) == 0
    assert ckpt.load_train_state(run).step == 6


def test_no_signal_for_many_steps_stops_with_one_line(chat_base, tasks, tmp_path, capsys):
    args = ["rl", "--no-progress", *rl_flags(chat_base, tasks, tmp_path / "o", "regex:never", max_iters=20,
                                             rl_no_signal_steps=3)]
    error_mid_run(capsys, args, "no learning signal: for 3 steps every group of 4 replies got equal rewards")


def test_a_model_without_chat_template_or_a_stranger_run(tasks, tmp_path, capsys):
    plain = make_run(tmp_path / "plain", ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=24),
                     CharTokenizer.train("0123456789 Aadn.+="))
    one_line_error(capsys, ["rl", "--init-from", str(plain), "--data", str(tasks), "--out", str(tmp_path / "o")],
                   "has no chat template")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("hello")
    one_line_error(capsys, ["rl", "--init-from", str(stranger), "--data", str(tasks), "--out", str(tmp_path / "o")],
                   "not a run directory")
    one_line_error(capsys, ["rl", "--data", str(tasks), "--out", str(tmp_path / "o")], "pass --init-from")
    assert not (tmp_path / "o").exists()


def test_rl_defaults_sit_under_the_preset_and_the_flags():
    cfg = rl_config(None, {"learning_rate": 2e-4})
    assert cfg.train.learning_rate == 2e-4 and cfg.train.batch_size == 8 and cfg.train.sample_tokens == 0
    with pytest.raises(QuillError, match="rl_group_size must be at least 2"):
        rl_config(None, {"rl_group_size": 1})
