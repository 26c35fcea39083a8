"""Human-perception evaluation: can readers tell real from synthetic brain MRI?

- `make_study(real_dir, synthetic_dir, out_dir, ...)` (and the `reader_study` job, jobs/) writes
  a static, self-contained HTML page for readers and a separate answer key.
- `brain_ldm_jax.reader_study.score.score(key, answer_sets)` / `python -m
  brain_ldm_jax.reader_study.score --key KEY A.json ...` score exported answers. (The function is
  not re-exported here: `reader_study.score` stays the module, as `python -m` names it.)
"""

from brain_ldm_jax.reader_study.study import make_study

__all__ = ["make_study"]
