"""
The arithmetic behind the studies' "A is x worse than B (95% interval ..)": Student's t over
paired seeds, written out so a reader can check it (no scipy needed at run time).

Two settings trained with the same seeds share their initial weights, batch order and
evaluation batches, so the difference of their results seed by seed removes the part of the
noise that the seed sets. With d_1 .. d_n those differences,

    mean = (1/n) sum d_i,  sd = sqrt(sum (d_i - mean)^2 / (n - 1))
    interval = mean +- t(0.975, n - 1) * sd / sqrt(n)

and the difference is "not significant" when the interval contains 0. Its two-sided p-value
is 1 - P(|T| <= |mean| / (sd / sqrt(n))). A table of m such comparisons adjusts the p-values
by Holm's step-down rule (`holm`), which keeps the chance of any false "significant" in the
table at 5%: sorted ascending, the k-th smallest is multiplied by m - k + 1 (k from 1), then
made non-decreasing, capped at 1.
"""
import math
import statistics


def t_coverage(t, df):
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom, by the
    closed forms of Abramowitz & Stegun 26.7.3-4 (theta = atan(t / sqrt(df))):
      df odd:  (2/pi) (theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)), up to
               cos^(df-2)
      df even: sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)"""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):   # cos, 2/3 cos^3, ...: df = 1 has none
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):              # 1, 1/2 cos^2, 1*3/(2*4) cos^4, ...
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(coverage, df):
    """The t with P(|T| <= t) = coverage (two-sided; 0.95 gives t(0.975, df)), by bisection on
    t_coverage, which grows with t."""
    if not 0 < coverage < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < coverage < 1 and df >= 1, got {coverage}, {df}")
    low, high = 0.0, 1.0
    while t_coverage(high, df) < coverage:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_coverage(mid, df) < coverage else (low, mid)
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2


def paired_difference(results, baseline, coverage=0.95):
    """Compare two settings over the seeds both have: `results` and `baseline` map seed ->
    metric. Returns dict(n, mean, low, high, significant): the mean difference (results minus
    baseline) and its t interval; low/high are None with fewer than 2 paired seeds."""
    seeds = sorted(set(results) & set(baseline))
    diffs = [results[s] - baseline[s] for s in seeds]
    out = dict(n=len(diffs), mean=statistics.mean(diffs) if diffs else math.nan, low=None,
               high=None, significant=False, p=None)
    if len(diffs) >= 2:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        half = t_quantile(coverage, len(diffs) - 1) * se
        out.update(low=out["mean"] - half, high=out["mean"] + half,
                   significant=not out["mean"] - half <= 0 <= out["mean"] + half,
                   p=1 - t_coverage(abs(out["mean"]) / se, len(diffs) - 1) if se > 0
                   else float(out["mean"] == 0))
    return out


def holm(p_values):
    """Holm-adjusted p-values, in the order given (None stays None: no interval)."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted, running = list(p_values), 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - k) * p))
        adjusted[i] = running
    return adjusted


def describe(diff, digits=3, scale=1.0):
    """'+0.041 (95% CI +0.012 .. +0.070)', with ', not significant' when the interval holds
    0, '+0.041 (1 seed: no interval)', or 'no paired seed'."""
    if diff["n"] == 0:
        return "no paired seed"
    f = f"{{:+.{digits}f}}"
    text = f.format(scale * diff["mean"])
    if diff["low"] is None:
        return text + f" ({diff['n']} seed{'s' if diff['n'] != 1 else ''}: no interval)"
    text += (f" (95% CI {f.format(scale * diff['low'])} .. {f.format(scale * diff['high'])})")
    return text if diff["significant"] else text + ", not significant"
