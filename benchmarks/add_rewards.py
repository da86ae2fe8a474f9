"""A reward with partial credit for additions (docs/rl.md: `--reward python:benchmarks/add_rewards.py:partial`).

    quill rl ... --reward python:benchmarks/add_rewards.py:partial
"""


def partial(messages, reply, answer, **fields):
    """1 for the right sum; 0.1 for each right digit of a reply of the right length; else 0."""
    digits = reply.strip()
    if digits == answer:
        return 1.0
    if not digits.isdigit() or len(digits) != len(answer):
        return 0.0
    return 0.1 * sum(a == b for a, b in zip(digits, answer))
