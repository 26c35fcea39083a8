"""The `reader_study` job: a study page and answer key (reader_study/) from config.reader_study."""

from __future__ import annotations

import os

from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.reader_study import study
from brain_ldm_jax.reader_study import trials as trials_lib

DEFAULTS = dict(
    real_dir="",
    synthetic_dir="",
    num_trials=40,
    trial_types=("slice", "triplet"),
    seed=0,
    out_dir="",
    confidence_levels=5,
    position_range=(0.3, 0.7),
    clip_percentiles=(0.5, 99.5),
    window="pooled",
    display_size=256,
    title="Real or synthetic?",
)


def run_reader_study_job(config, workdir: str) -> dict:
  """The `reader_study` job: settings from `config.reader_study` (see configs/reader_study.py).

  `real_dir` defaults to `config.data.data_dir`, else `<workdir>/cohort` when that exists;
  `synthetic_dir` must be set (a folder of generated NIfTI volumes); `out_dir` defaults to
  `<workdir>/reader_study`.
  """
  section = config.get("reader_study") if hasattr(config, "get") else None
  if section is None:
    raise ConfigError("config.reader_study is missing: use configs/reader_study.py")
  opts = dict(DEFAULTS)
  unknown = set(section.keys()) - set(DEFAULTS)
  if unknown:
    raise ConfigError(f"config.reader_study has unknown fields {sorted(unknown)}; known: "
                      f"{sorted(DEFAULTS)}")
  opts.update({k: section[k] for k in section.keys()})
  if not opts["real_dir"]:
    data_dir = config.get("data", {}).get("data_dir", "") if hasattr(config, "get") else ""
    cohort = os.path.join(workdir, "cohort")
    opts["real_dir"] = data_dir or (cohort if os.path.isdir(cohort) else "")
  if not opts["synthetic_dir"]:
    raise ConfigError("config.reader_study.synthetic_dir is empty: set it to a folder of "
                      "generated NIfTI volumes (e.g. the generate job's output), "
                      "--config.reader_study.synthetic_dir=DIR")
  out_dir = opts.pop("out_dir") or os.path.join(workdir, "reader_study")
  # Both classes on the run's MNI grid (samples already are; real scans are put there).
  result = study.make_study(out_dir=out_dir, grid=trials_lib.Grid.from_config(config.data), **opts)
  print(f"reader study {result['study_id']}:\n  page (send to readers): {result['page']}\n"
        f"  answer key (keep private): {result['key']}\n  score with: python -m "
        f"brain_ldm_jax.reader_study.score --key {result['key']} ANSWERS.json ...")
  return result
