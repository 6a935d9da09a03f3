"""The study's presets: one GPT, its data subset and the run lengths per preset.

full (the default) and quick: the arms of star/study/arms.py ARMS, fp32, one run at a time. long: the long
arms (LONG_ARMS) on the same data and model, checkpointed at fixed fractions of each run and evaluated at each
one, trained with the fast step (bf16 autocast, compiled, two runs side by side on one thread each; `make bench`
measures it against the default step). gpu: long at GPU scale, with a fine-tune arm. round3: the recipes of
ROUND3_ARMS at equal compute, on a tokenizer of its own.
"""
from __future__ import annotations

# The study's fast step (see bench/study_step.py): bf16 autocast with fp32 attention on the CPU, compiled.
FAST_STEP = ["--precision", "bf16", "--compile"]
# The smoke presets skip the compile (minutes of C++ on a cold cache, for steps of milliseconds); the compiled
# step itself is tested against eager in tests/test_training_step.py.
SMOKE_STEP = ["--precision", "bf16"]
# Round 3's tokenizer recipe (docs/study.md, round 3): a cosine from train_vq.py's 2e-3 down to 1e-4.
ROUND3_VQ_FLAGS = ["--lr-schedule", "cosine", "--min-lr-fraction", "0.05"]
GPU_GPT = {"dim": 384, "n_layer": 8, "n_head": 6, "num_classes": 10, "block_size": 64, "multiple_of": 64,
           "token_dropout_p": 0.1, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1}
GPT_SMALL = {"dim": 128, "n_layer": 4, "n_head": 4, "num_classes": 10, "block_size": 64, "multiple_of": 64,
             "token_dropout_p": 0.1, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1}
# name: (plan fields, images per class {"train": n, "test": m} (0 = all) or None for the full splits).
# Sized from CPU-second rates measured on this 2-core machine (see the study's report): Inception features
# (about 18 images per CPU-second in bf16 with AMX, 5 in fp32) and the VQ dominate, so the full study trains
# on 1,000 images per class (x 10 crops) and scores against the complete 10k test split.
PRESETS = {
    "full": (dict(vq_steps=600, vq_batch_size=32, gpt=GPT_SMALL, steps=300, batch_size=64, lr=1e-3,
                  num_samples=5000, cfg_scale=2.0, probe_positions=[1, 8, 16, 24, 32, 40, 48, 56, 64],
                  probe_limit=10000, main_seeds=[0, 1], other_seeds=[0], third_seed_if_close=True),
             {"train": 1000, "test": 0}),
    "quick": (dict(vq_steps=100, vq_batch_size=32, gpt=GPT_SMALL, steps=100, batch_size=32, lr=1e-3,
                   num_samples=200, cfg_scale=2.0, probe_positions=[1, 16, 32, 48, 64], probe_limit=1000,
                   main_seeds=[0], other_seeds=[0], third_seed_if_close=False), {"train": 100, "test": 20}),
    "smoke": (dict(vq_steps=20, vq_batch_size=16, gpt={**GPT_SMALL, "dim": 32, "n_layer": 2, "n_head": 2},
                   steps=4, batch_size=8, lr=1e-3, num_samples=20, cfg_scale=2.0, probe_positions=[1, 64],
                   probe_limit=1000, main_seeds=[0], other_seeds=[0], third_seed_if_close=False), None),
    "long": (dict(vq_steps=600, vq_batch_size=32, gpt=GPT_SMALL, steps=3000, short_steps=300, batch_size=64,
                  lr=1e-3, num_samples=5000, curve_samples=1000, cfg_scale=2.0,
                  probe_positions=[1, 8, 16, 24, 32, 40, 48, 56, 64], probe_limit=10000, main_seeds=[0, 1, 2],
                  other_seeds=[0, 1], third_seed_if_close=False, milestones=[0.1, 1 / 3, 2 / 3, 1.0],
                  train_flags=FAST_STEP, jobs=2),
             {"train": 1000, "test": 0}),
    "long-smoke": (dict(vq_steps=20, vq_batch_size=16, gpt={**GPT_SMALL, "dim": 32, "n_layer": 2, "n_head": 2},
                        steps=6, short_steps=3, batch_size=8, lr=1e-3, num_samples=20, curve_samples=20,
                        cfg_scale=2.0, probe_positions=[1, 64], probe_limit=1000, main_seeds=[0],
                        other_seeds=[0], third_seed_if_close=False, milestones=[0.5, 1.0], train_flags=SMOKE_STEP,
                        jobs=2), None),
    # The same study at a scale a CPU cannot reach: a 3x wider, 2x deeper GPT (14.6M parameters), twice the batch,
    # three runs side by side on one GPU. Measured on one H200 (torch 2.11, 2026-12-04, docs/study.md "At GPU
    # scale"): with the long round's 600-step VQ its ceiling was FID-5k 62.1 and L1's last checkpoint 63.4, the cap
    # round 3 was built to lift, so the VQ is round 3's recipe (the cosine from 2e-3 to 1e-4) over the same 96k crops
    # (1,500 steps of 64; 600 took 44 s). The tokenizer stages took 2.3 min and the training 4 (L1's 5,333 steps in
    # 160 s beside L3 and L6's 2,000 ST-AR steps in 131 s; L8 42 s); 3 jobs scored 60 of its 82 stages in 6.4 min:
    # each stage is a process whose start-up outweighs its GPU work (12-15 s per 1k-sample stage, the GPU 12-23%
    # busy), so it runs 6 side by side. About 12 minutes in all (estimated): two 10-minute calls, the second resuming.
    "gpu": (dict(vq_steps=1500, vq_batch_size=64, vq_flags=ROUND3_VQ_FLAGS,
                 gpt=GPU_GPT, steps=2000, short_steps=200, batch_size=128, lr=1e-3,
                 num_samples=5000, curve_samples=1000, cfg_scale=2.0, probe_positions=[1, 8, 16, 24, 32, 40, 48, 56, 64],
                 probe_limit=10000, main_seeds=[0], other_seeds=[0], third_seed_if_close=False,
                 milestones=[0.5, 1.0], train_flags=FAST_STEP, jobs=6, extra_seed_for_best=False),
            {"train": 1000, "test": 0}),
    "gpu-smoke": (dict(vq_steps=20, vq_batch_size=16, gpt={**GPU_GPT, "dim": 32, "n_layer": 2, "n_head": 2},
                       steps=4, short_steps=2, batch_size=8, lr=1e-3, num_samples=20, curve_samples=20, cfg_scale=2.0,
                       probe_positions=[1, 64], probe_limit=1000, main_seeds=[0], other_seeds=[0],
                       third_seed_if_close=False, milestones=[0.5, 1.0], train_flags=SMOKE_STEP, jobs=2,
                       extra_seed_for_best=False), None),
    # Round 3 (ROUND3_ARMS, star/study/long_arms.py): recipes that could pay at equal compute, 3 seeds each, on a
    # tokenizer of its own (vq_flags). Measured on this data (docs/study.md, round 3): the ceiling is set by the
    # VQ's length and a falling learning rate, not the GAN (2,000 steps at 2e-3 then 1,000 at 1e-4: FID-1k 47.3 with
    # L2 alone, 48.3 with the PatchGAN); the cosine from 2e-3 to 1e-4 is that schedule as one command.
    # Compute, from the long round's rates (GPT_SMALL, batch 64, the fast step: 0.31 CPU-s per plain step, 0.63 per
    # ST-AR step, the one-view step 1.2x plain; scoring 240 CPU-s per checkpoint (NLL, probe, FID-1k pair), 720 per
    # FID-5k pair): training R1 3 x 8,000 steps 7,440 CPU-s; R2, R3, R5 3 x 3,000 ST-AR steps 17,150; R4 3 x 1,301
    # 2,480; R6 3 x 3,000 one-view steps 3,350: 30,400 CPU-s. Scoring 69 checkpoints 16,560 and 30 FID-5k pairs
    # (every run's last, R1's four answer steps) 21,600: 38,200. 68,600 CPU-s of stages, two side by side: 9.5
    # wall-hours, plus the VQ (3,000 steps), tokens and ceiling alone on both cores (~0.7 h): about 10 wall-hours.
    "round3": (dict(vq_steps=3000, vq_batch_size=32, vq_flags=ROUND3_VQ_FLAGS,
                    gpt=GPT_SMALL, steps=3000, batch_size=64, lr=1e-3, num_samples=5000, curve_samples=1000,
                    cfg_scale=2.0, probe_positions=[1, 8, 16, 24, 32, 40, 48, 56, 64], probe_limit=10000,
                    main_seeds=[0, 1, 2], other_seeds=[0, 1, 2], third_seed_if_close=False,
                    milestones=[1 / 3, 2 / 3, 1.0], train_flags=FAST_STEP, jobs=2, extra_seed_for_best=False,
                    equal_compute_checkpoints=True),
               {"train": 1000, "test": 0}),
    # round3-smoke shares long-smoke's VQ settings (its test reuses that study's data, VQ and tokens)
    "round3-smoke": (dict(vq_steps=20, vq_batch_size=16,
                          gpt={**GPT_SMALL, "dim": 32, "n_layer": 2, "n_head": 2}, steps=6, batch_size=8, lr=1e-3,
                          num_samples=20, curve_samples=20, cfg_scale=2.0, probe_positions=[1, 64], probe_limit=1000,
                          main_seeds=[0], other_seeds=[0], third_seed_if_close=False, milestones=[1.0],
                          train_flags=SMOKE_STEP, jobs=2, extra_seed_for_best=False, equal_compute_checkpoints=True),
                     None),
}
# The arms a preset runs when --arms is not given.
DEFAULT_ARMS = {"quick": "1,2,3", "gpu": "L1,L3,L6,L8", "gpu-smoke": "L1,L3"}
