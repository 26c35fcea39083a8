r"""Score a reader study against its answer key.

    python -m brain_ldm_jax.reader_study.score --key KEY.json A.json [B.json ...] [--out OUT]

Statistics (per reader, pooled over readers, overall and by trial type):
- accuracy with a 95% Clopper-Pearson (exact) interval;
- an exact two-sided binomial test of accuracy against 0.5 (chance); "distinguishable" means
  p < 0.05. Accuracy far BELOW chance is also distinguishable (readers tell the classes apart but
  swap the labels);
- synthetic is the POSITIVE class: sensitivity = P(answer synthetic | synthetic) (hit rate),
  specificity = P(answer real | real), false-alarm rate = 1 - specificity;
- d' = z(H) - z(F) with the log-linear correction (Hautus 1995): H = (hits + 0.5) / (n_synthetic
  + 1), F = (false alarms + 0.5) / (n_real + 1), applied to every cell so that rates of 0 or 1
  stay finite and the estimate is not biased by which cells happen to be extreme;
- AUC of the confidence-rating ROC: each answer becomes a score (+confidence if "synthetic",
  -confidence if "real"), AUC = P(score of a synthetic trial > score of a real one), ties 1/2.
Pooling over readers treats responses as independent, which ignores between-reader variation;
per-reader rows show it.
Unanswered trials are left out and counted as missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Iterable, Mapping, Sequence

from brain_ldm_jax import files
from brain_ldm_jax.errors import DataError, UserError

ANSWERS_FORMAT = "brain_ldm_jax.reader_study.answers/1"
KEY_FORMAT = "brain_ldm_jax.reader_study.key/1"
POSITIVE = "synthetic"
NEGATIVE = "real"
ALPHA = 0.05
METHODS = {
    "positive_class": POSITIVE,
    "accuracy_ci": "95% Clopper-Pearson (exact binomial)",
    "test": "exact two-sided binomial test of accuracy vs 0.5; distinguishable if p < 0.05",
    "d_prime": "z(H) - z(F), log-linear correction (Hautus 1995): (count + 0.5) / (n + 1)",
    "auc": "confidence-rating ROC: score = +confidence if 'synthetic', -confidence if 'real'",
    "pooling": "pooled rows treat all readers' responses as independent",
}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
  """Exact binomial confidence interval for k successes in n trials."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  if n <= 0:
    return (float("nan"), float("nan"))
  a = 1.0 - level
  lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
  hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
  return lo, hi


def binomial_p(k: int, n: int) -> float:
  """Exact two-sided binomial test p-value of k of n against p = 0.5."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  if n <= 0:
    return float("nan")
  return float(stats.binomtest(k, n, 0.5, alternative="two-sided").pvalue)


def d_prime(hits: int, n_signal: int, false_alarms: int, n_noise: int) -> float:
  """d' with the log-linear correction; NaN unless both classes were shown."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  if n_signal <= 0 or n_noise <= 0:
    return float("nan")
  h = (hits + 0.5) / (n_signal + 1.0)
  f = (false_alarms + 0.5) / (n_noise + 1.0)
  return float(stats.norm.ppf(h) - stats.norm.ppf(f))


def rating_auc(truths: Sequence[str], answers: Sequence[str],
               confidences: Sequence[int | None]) -> float:
  """Area under the confidence-rating ROC (Mann-Whitney form); NaN unless both classes present."""
  scores = [(c or 1) * (1 if a == POSITIVE else -1) for a, c in zip(answers, confidences)]
  pos = [s for s, t in zip(scores, truths) if t == POSITIVE]
  neg = [s for s, t in zip(scores, truths) if t == NEGATIVE]
  if not pos or not neg:
    return float("nan")
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  return float(wins / (len(pos) * len(neg)))


def metrics(truths: Sequence[str], answers: Sequence[str],
            confidences: Sequence[int | None]) -> dict:
  """All statistics for one set of answered trials (parallel lists)."""
  n = len(truths)
  correct = sum(t == a for t, a in zip(truths, answers))
  n_pos = sum(t == POSITIVE for t in truths)
  n_neg = n - n_pos
  hits = sum(t == POSITIVE and a == POSITIVE for t, a in zip(truths, answers))
  false_alarms = sum(t == NEGATIVE and a == POSITIVE for t, a in zip(truths, answers))
  accuracy = correct / n if n else float("nan")
  p = binomial_p(correct, n)
  return {
      "n": n,
      "n_correct": correct,
      "accuracy": accuracy,
      "accuracy_ci95": list(clopper_pearson(correct, n)),
      "p_value": p,
      "distinguishable": bool(n and p < ALPHA),
      "n_synthetic": n_pos,
      "n_real": n_neg,
      "sensitivity": hits / n_pos if n_pos else float("nan"),
      "specificity": (n_neg - false_alarms) / n_neg if n_neg else float("nan"),
      "d_prime": d_prime(hits, n_pos, false_alarms, n_neg),
      "auc": rating_auc(truths, answers, confidences),
      "mean_confidence": (sum(c or 0 for c in confidences) / n) if n else float("nan"),
  }


def _key_trials(key: Mapping) -> dict:
  if not isinstance(key, Mapping) or "trials" not in key or "study_id" not in key:
    raise DataError("the answer key lacks 'study_id' or 'trials': is it answer_key.json?")
  return {t["id"]: t for t in key["trials"]}


def _responses(key_trials: Mapping, answers: Mapping, name: str) -> tuple[list, int]:
  """[(truth, type, answer, confidence)] for answered trials, and the number missing."""
  rows = answers.get("answers")
  if not isinstance(rows, list):
    raise DataError(f"{name}: no 'answers' list; is it a file exported by the study page?")
  seen, out = set(), []
  for row in rows:
    tid = row.get("trial_id")
    if tid not in key_trials:
      raise DataError(f"{name}: trial_id {tid!r} is not in the answer key")
    if tid in seen:
      raise DataError(f"{name}: trial_id {tid!r} is answered twice")
    seen.add(tid)
    answer = row.get("answer")
    if answer is None:
      continue
    if answer not in (POSITIVE, NEGATIVE):
      raise DataError(f"{name}: trial {tid!r} has answer {answer!r}; expected 'real' or "
                      "'synthetic'")
    conf = row.get("confidence")
    if conf is not None and not isinstance(conf, int):
      raise DataError(f"{name}: trial {tid!r} has confidence {conf!r}; expected an integer")
    truth = key_trials[tid]
    out.append((truth["truth"], truth["type"], answer, conf))
  return out, len(key_trials) - len(out)


def _summarise(responses: Iterable[tuple]) -> dict:
  responses = list(responses)
  by_type = {}
  for trial_type in sorted({r[1] for r in responses}):
    sub = [r for r in responses if r[1] == trial_type]
    by_type[trial_type] = metrics([r[0] for r in sub], [r[2] for r in sub], [r[3] for r in sub])
  overall = metrics([r[0] for r in responses], [r[2] for r in responses],
                    [r[3] for r in responses])
  return {"overall": overall, "by_type": by_type}


def score(key: Mapping, answer_sets: Sequence[Mapping]) -> dict:
  """Score answer sets (dicts as exported by the page) against a key (dict as written).

  Returns a JSON-ready dict: study_id, methods, per-reader results (overall and by trial type,
  with n_missing) and pooled results over all readers.
  """
  key_trials = _key_trials(key)
  if not answer_sets:
    raise DataError("no answer files given")
  readers, pooled, used_names = [], [], {}
  for i, answers in enumerate(answer_sets):
    name = str(answers.get("_source") or answers.get("reader") or f"answers #{i + 1}")
    if answers.get("study_id") != key["study_id"]:
      raise DataError(f"{name}: study_id {answers.get('study_id')!r} does not match the key's "
                      f"{key['study_id']!r}; answers belong to another study")
    reader = str(answers.get("reader") or f"reader{i + 1}")
    used_names[reader] = used_names.get(reader, 0) + 1
    if used_names[reader] > 1:  # two files from one name: keep both, distinguishably
      reader = f"{reader}#{used_names[reader]}"
    responses, missing = _responses(key_trials, answers, name)
    pooled.extend(responses)
    readers.append({"reader": reader, "source": answers.get("_source"), "n_missing": missing,
                    **_summarise(responses)})
  return {
      "study_id": key["study_id"],
      "num_trials": len(key_trials),
      "methods": METHODS,
      "readers": readers,
      "pooled": {"num_readers": len(readers), **_summarise(pooled)},
  }


def _fmt(x, digits=3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.{digits}f}"


def _fmt_p(p) -> str:
  if p is None or math.isnan(p):
    return "-"
  return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def format_table(result: Mapping) -> str:
  """A readable fixed-width table of `score`'s result."""
  header = (f"{'reader':<16} {'trials':<8} {'n':>4} {'acc':>6} {'95% CI':>15} {'sens':>6} "
            f"{'spec':>6} {'d′':>6} {'AUC':>6} {'p':>8}  distinguishable")
  lines = [f"Reader study {result['study_id']} ({result['num_trials']} trials). "
           "Synthetic = positive class; CI: Clopper-Pearson 95%; p: exact two-sided binomial "
           "vs 0.5; d′: log-linear corrected.", header, "-" * len(header)]

  def row(name, kind, m):
    ci = f"[{_fmt(m['accuracy_ci95'][0])}, {_fmt(m['accuracy_ci95'][1])}]"
    verdict = "yes" if m["distinguishable"] else "no"
    lines.append(f"{name[:16]:<16} {kind:<8} {m['n']:>4} {_fmt(m['accuracy']):>6} {ci:>15} "
                 f"{_fmt(m['sensitivity']):>6} {_fmt(m['specificity']):>6} "
                 f"{_fmt(m['d_prime'], 2):>6} {_fmt(m['auc']):>6} {_fmt_p(m['p_value']):>8}  "
                 f"{verdict}")

  groups = [(r["reader"], r) for r in result["readers"]]
  groups.append((f"POOLED ({result['pooled']['num_readers']})", result["pooled"]))
  for name, g in groups:
    row(name, "all", g["overall"])
    for kind, m in g["by_type"].items():
      row("", kind, m)
  missing = [f"{r['reader']}: {r['n_missing']}" for r in result["readers"] if r["n_missing"]]
  if missing:
    lines.append("unanswered trials (left out): " + ", ".join(missing))
  return "\n".join(lines)


def load_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise DataError(f"{what} {path}: no such file") from e
  except (OSError, ValueError) as e:
    raise DataError(f"{what} {path}: not readable JSON ({e})") from e


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m brain_ldm_jax.reader_study.score",
      description="Score reader-study answer files against the study's answer key.")
  parser.add_argument("--key", required=True, help="answer_key.json written with the study")
  parser.add_argument("answers", nargs="+", help="answer files exported from the study page")
  parser.add_argument("--out", default="",
                      help="where to write the JSON result (default: scores.json beside the key)")
  args = parser.parse_args(argv)
  try:
    key = load_json(args.key, "answer key")
    sets = []
    for path in args.answers:
      answers = load_json(path, "answer file")
      if not isinstance(answers, dict):
        raise DataError(f"answer file {path}: expected a JSON object")
      sets.append({**answers, "_source": path})
    result = score(key, sets)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.key)), "scores.json")
  files.write_text_atomic(out, json.dumps(_json_safe(result), indent=1))
  print(format_table(result))
  print(f"\nwrote {out}")
  return 0


def _json_safe(x):
  """NaN is not JSON: write null instead."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


if __name__ == "__main__":
  sys.exit(main())
