"""Make a reader study: trials -> the static page + the answer key (two separate files)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
from typing import Sequence

from brain_ldm_jax import figures
from brain_ldm_jax import files
from brain_ldm_jax.errors import ConfigError
from brain_ldm_jax.reader_study import page as page_lib
from brain_ldm_jax.reader_study import trials as trials_lib

KEY_FORMAT = "brain_ldm_jax.reader_study.key/1"
PAGE_NAME = "reader_study.html"
KEY_NAME = "answer_key.json"


def make_study(real_dir: str,
               synthetic_dir: str,
               out_dir: str,
               num_trials: int = 40,
               trial_types: Sequence[str] = ("slice", "triplet"),
               seed: int = 0,
               confidence_levels: int = 5,
               position_range: Sequence[float] = (0.3, 0.7),
               clip_percentiles: Sequence[float] = (0.5, 99.5),
               window: str = "pooled",
               display_size: int = 256,
               title: str = "Real or synthetic?",
               grid: trials_lib.Grid | None = None) -> dict:
  """Draw, render and write a study; returns {"page": path, "key": path, "study_id": id}.

  The page (`reader_study.html`) is what readers get; the key (`answer_key.json`) stays with the
  organiser. The seed fixes which volumes, views and order are used; trial ids and the study id
  are fresh random tokens every time, so nothing in the page can be derived from the seed.
  With `grid` (the job passes the run's), every volume is loaded onto it through its affine;
  without, volumes are taken as they are and should already share one grid.
  """
  if not 2 <= int(confidence_levels) <= 9:
    raise ConfigError(f"config.reader_study.confidence_levels={confidence_levels} must be in "
                      "[2, 9] (one key per level)")
  real = trials_lib.find_volumes(real_dir, "config.reader_study.real_dir")
  synthetic = trials_lib.find_volumes(synthetic_dir, "config.reader_study.synthetic_dir")
  _check_disjoint(real, synthetic)
  percentiles = figures.check_percentiles(clip_percentiles)
  specs = trials_lib.plan_trials(real, synthetic, int(num_trials), trial_types,
                                 tuple(position_range), int(seed))
  images, info = trials_lib.render_trials(specs, percentiles, str(window), int(display_size),
                                          grid)

  study_id = "s" + secrets.token_hex(5)
  payload = page_lib.page_payload(
      study_id, str(title), int(confidence_levels),
      [{"id": s.trial_id, "type": s.view.trial_type, "images": images[s.trial_id]} for s in specs])
  html_text = page_lib.build_page(payload)
  key = _key(study_id, specs, info, real_dir, synthetic_dir, dict(
      num_trials=int(num_trials), trial_types=list(trials_lib.check_trial_types(trial_types)),
      seed=int(seed), confidence_levels=int(confidence_levels),
      position_range=list(position_range), clip_percentiles=list(percentiles),
      window=str(window), display_size=int(display_size), title=str(title)))

  os.makedirs(out_dir, exist_ok=True)
  page_path = os.path.join(out_dir, PAGE_NAME)
  key_path = os.path.join(out_dir, KEY_NAME)
  files.write_text_atomic(key_path, json.dumps(key, indent=1))
  files.write_text_atomic(page_path, html_text)
  logging.info("reader study %s: %d trials; page %s (send to readers), key %s (keep private)",
               study_id, len(specs), page_path, key_path)
  return {"page": page_path, "key": key_path, "study_id": study_id}


def _check_disjoint(real: Sequence[str], synthetic: Sequence[str]) -> None:
  both = set(map(os.path.realpath, real)) & set(map(os.path.realpath, synthetic))
  if both:
    raise ConfigError("config.reader_study.real_dir and synthetic_dir share files, e.g. "
                      f"{sorted(both)[0]}: point them at separate folders")


def _key(study_id, specs, info, real_dir, synthetic_dir, settings) -> dict:
  return {
      "format": KEY_FORMAT,
      "study_id": study_id,
      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "positive_class": "synthetic",
      "real_dir": os.path.abspath(real_dir),
      "synthetic_dir": os.path.abspath(synthetic_dir),
      "settings": settings,
      "rendering": {k: v for k, v in info.items() if k != "voxel_indices"},
      "trials": [{
          "id": s.trial_id,
          "position": i + 1,
          "truth": s.truth,
          "type": s.view.trial_type,
          "planes": list(s.view.planes),
          "relative_position": [round(p, 4) for p in s.view.position],
          "voxel_indices": info["voxel_indices"][s.trial_id],
          "source": s.source,
      } for i, s in enumerate(specs)],
  }
