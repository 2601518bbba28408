"""Paired statistics for closed-loop evaluations; needs no simulator.

Every setting of the Meta-World harness runs on the same layouts (seeds) and the same
noise draws as the plain policy, so the comparison is paired: only the episodes where
exactly one of the two succeeds (the discordant pairs) carry information about the
difference. McNemar's exact test is the two-sided binomial test on those pairs.
"""

from collections.abc import Sequence

import numpy as np
import scipy.stats


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of `k` successes in `n` fair coin flips.

    `scipy.stats.binomtest(k, n, 0.5).pvalue`: the sum of the probabilities of all
    outcomes at most as likely as `k`.

    **Arguments:**

    - `k`: the observed count, `0 <= k <= n`.
    - `n`: the number of trials, `>= 0`.

    **Returns:**

    The p-value, a float in `[0, 1]`; `1.0` when `n == 0`.
    """
    if not (isinstance(n, int) and isinstance(k, int) and 0 <= k <= n):
        raise ValueError(f"Need integers 0 <= k <= n; got k={k!r}, n={n!r}.")
    if n == 0:
        # No discordant pair: no evidence either way (binomtest refuses n = 0).
        return 1.0
    return float(scipy.stats.binomtest(k, n, 0.5).pvalue)


def mcnemar(wins: int, losses: int) -> float:
    """Exact McNemar p-value from the discordant pairs of a paired comparison.

    **Arguments:**

    - `wins`: episodes the setting solved and the baseline did not.
    - `losses`: episodes the baseline solved and the setting did not.

    **Returns:**

    The two-sided exact p-value (binomial test of `wins` in `wins + losses` at 1/2).
    """
    if not (isinstance(wins, int) and isinstance(losses, int) and wins >= 0 and losses >= 0):
        raise ValueError(f"`wins` and `losses` must be ints >= 0; got {wins!r}, {losses!r}.")
    return binomial_two_sided(wins, wins + losses)


def paired_counts(
    baseline: Sequence[bool] | np.ndarray, setting: Sequence[bool] | np.ndarray
) -> tuple[int, int]:
    """`(wins, losses)` of `setting` against `baseline` over the same episodes."""
    b = np.asarray(baseline, bool)
    s = np.asarray(setting, bool)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(
            "`baseline` and `setting` must be 1-d success arrays over the same episodes; got "
            f"shapes {b.shape} and {s.shape}."
        )
    return int(np.sum(s & ~b)), int(np.sum(b & ~s))


def format_table(
    rows: Sequence[dict],
    *,
    baseline: str,
    null_spread: Sequence[int] | None = None,
    expert: int | None = None,
    episodes_per_key: int | None = None,
    num_settings: int | None = None,
) -> str:
    """A plain-text paired table: successes, wins/losses against the baseline, p-value.

    **Arguments:**

    - `rows`: dicts with `name`, `success` (pooled count), `total`, `wins`, `losses`,
        `p` and optionally `per_key` (success per noise key) and `extra` (a string).
    - `baseline`: the name of the baseline row (printed in the header).
    - `null_spread`: the plain policy's successes under each noise key.
    - `expert`: the scripted expert's successes on the same seeds (the ceiling).
    - `episodes_per_key`: episodes per noise key.
    - `num_settings`: how many settings were compared (for the reader's multiple-
        comparison correction).
    """
    lines = []
    if expert is not None and episodes_per_key is not None:
        lines.append(f"scripted expert on the same seeds: {expert}/{episodes_per_key}")
    if null_spread is not None:
        lines.append(
            f"null spread (plain policy, one count per noise key): {list(null_spread)} "
            f"(range {max(null_spread) - min(null_spread)})"
        )
    if num_settings is not None:
        lines.append(f"settings compared with '{baseline}': {num_settings}")
    header = f"{'setting':<28} {'success':>11} {'per key':>16} {'+win/-loss':>11} {'p':>9}  notes"
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        per_key = "/".join(str(x) for x in r.get("per_key", []))
        wl = "" if r["name"] == baseline else f"+{r['wins']}/-{r['losses']}"
        p = "" if r["name"] == baseline else f"{r['p']:.2g}"
        lines.append(
            f"{r['name']:<28} {r['success']:>5}/{r['total']:<5} {per_key:>16} {wl:>11} "
            f"{p:>9}  {r.get('extra', '')}"
        )
    return "\n".join(lines)
