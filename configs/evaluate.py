"""Evaluate a trained run: diversity (MS-SSIM, 4-G-R-SSIM), FID, conditioning fidelity, memorisation.

    python -m brain_ldm_jax.main --config=configs/evaluate.py:demo --workdir=DIR \
        --config.evaluate.run_dir=runs/demo --config.evaluate.num_samples=100

Writes DIR/evaluation/report.json, report.html and its PNG figures (or --config.evaluate.out_dir).
The run's own config (its run.json) decides the data, networks and grid; this file only holds the
evaluation settings. FID needs MedicalNet weights (fid_weights_path) or an explicit alternative
extractor (fid_extractor="autoencoder_latent", reported under that name, not comparable to the paper).
"""

from ml_collections import config_dict

from brain_ldm_jax import presets


def get_config(preset=None):
  config = presets.base_config(preset)
  config.job = "evaluate"
  preset = config.preset
  config.evaluate = dict(
      run_dir=config_dict.placeholder(str),  # trained run (its workdir); default: --workdir
      out_dir=config_dict.placeholder(str),  # default: <workdir>/evaluation
      num_samples={"paper": 1000, "demo": 64, "test": 4}[preset],
      sampler=config_dict.placeholder(str),  # default: the run's sampling.sampler
      num_steps=config_dict.placeholder(int),  # default: the run's sampling.num_steps
      batch_size={"paper": 8, "demo": 8, "test": 2}[preset],
      num_pairs={"paper": 1000, "demo": 200, "test": 3}[preset],  # random pairs for diversity
      seed=0,
      # Read these NIfTI samples (+ conditions.tsv) instead of generating.
      samples_dir=config_dict.placeholder(str),
      save_samples=True,  # write generated samples (NIfTI + conditions.tsv) to out_dir/samples
      fid_extractor="med3d",  # med3d | autoencoder_latent | none
      # MedicalNet .pth; unset: FID refused (med3d) with how to get them.
      fid_weights_path=config_dict.placeholder(str),
      fid_depth=config_dict.placeholder(int),  # default: inferred from the weights
      max_real=config_dict.placeholder(int),  # validation subjects as the real set; default: all
      calibration_subjects={"paper": 300, "demo": 60, "test": 8}[preset],  # training subjects
      # A stored volumes calibration JSON instead of fitting one.
      calibration_path=config_dict.placeholder(str),
      # Training subjects searched for neighbours; default: all.
      memorisation_train_subjects=config_dict.placeholder(int),
      ssim_candidates=10,  # image SSIM only against each query's k latent-nearest; 0: all
      flag_percentile=1.0,
      montage_count=4,
  )
  return config
