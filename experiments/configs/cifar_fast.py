r"""Time to accuracy, airbench-style: airbench94's network and recipe (Keller Jordan,
arXiv:2404.00498: 94.0% CIFAR-10 in 3.8 A100-seconds) on this 2-core CPU.

  python -m experiments.train --config experiments/configs/cifar_fast.py --workdir runs/cifar_fast
  (offline: add --config.data.source=../shared/data/cifar10.npz)

AirbenchNet (cnnjax/models/airbench.py: frozen data-whitened 2x2 stem, dirac-initialised
convs, scale-free batch norm, 1/9 logit scale), all 50k training images (no validation
split), batch 1024, Nesterov SGD 0.85, label smoothing 0.2, batch-norm offsets at 64x the
learning rate, random 2-pixel translations and flips, Lookahead-EMA (every 5 steps, decay
0.95 per step ramped up as (step / total)^3), 10 epochs, test-time flips and 1-pixel
translations (airbench's tta_level 2). Airbench's lr 11.5 is per 1024 examples of a summed
loss, scaled by 1 / (1024 * (1 + 1 / (1 - momentum))); here the loss is a mean, so lr 1.5.
Its weight decay 0.0153 is scaled the same way and then divided by that rate (torch's
``weight_decay=wd / lr``): an L2 term of 0.0153 / 11.5 on the mean loss. Left out: the
whitening bias frozen after 3 epochs, alternating flips, reflect-padded crops
(ours pad with zeros), decay on the batch-norm offsets and the whitening bias.

Result (2-core Intel Xeon with AMX, 2026-12-05, --config.precision=bfloat16), seeds 0-4,
one at a time (18:37-19:25): 94.3/93.9/94.3/94.0/94.9% on the 1,000 lossless test images
(mean 94.28%, sd 0.39), 86.5/86.6/86.3/86.5/86.6% on 10k (mean 86.51%), 10.0/8.0/9.9/11.1/
8.7 min wall (mean 9.5 min; epochs of 44-77 s as the machine's speed varied). Seed 0 again
at 20:57 with oneDNN's operands aligned: the same accuracy, 8.0 min (epochs of 44-51 s).
The same on a 2-core AMD EPYC with AVX-512 BF16 and no AMX (2026-12-04), seeds 0-4:
94.3/94.0/94.5/94.0/94.0% on the lossless images (mean 94.16%, sd 0.22),
86.9/86.5/86.5/86.4/86.4% on 10k (9k JPEG; mean 86.55%), 20.6-22.5 min wall each (10 epochs
of 115-144 s, test with its 6 views ~41 s). The 1,000 images alone give +/-0.7 points of
sampling error. Before this recipe's fixes of that day (L2 decay 683x too weak: airbench's
decay was scaled like its rate but not divided by it; batch-norm momentum inverted; the
linear one-cycle's third phase; no lookahead, flip-only test views), float32, 2026-12-01:
92.6/92.5/93.5% lossless (seeds 0-2), 84.2/84.7/84.1% on 10k, 17.0 min (epochs of ~100 s
on that day's faster VM). The network trains with 0.62 GFLOP per image
(``benchmarks/roofline.py``'s count): 10 epochs of 49,152 images are 0.30 PFLOP, 11.3
minutes at the AMD cores' bf16 peak for a large matrix product (0.445 TFLOP/s; its runs
sustained 0.21-0.26), 2.3-2.7 minutes at the Intel cores' (1.86-2.21 TFLOP/s; its epochs of
44-77 s sustained 0.40-0.69).
"""
from experiments.configs import default

MOMENTUM = 0.85
KILOSTEP = 1024 * (1 + 1 / (1 - MOMENTUM))  # airbench's normalisation of lr and decay


def get_config():
  c = default.get_config()
  c.model.name = "airbench"
  c.data.val_size = 0
  c.data.augment.crop_padding = 2
  c.data.augment.horizontal_flip = True
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 10
  c.label_smoothing = 0.2
  c.eval_flip = True
  c.eval_shift = 1
  c.ema, c.lookahead = 0.95, 5
  c.optimizer.name = "sgd"
  c.optimizer.momentum = MOMENTUM
  c.optimizer.nesterov = True
  c.optimizer.lr = 11.5 * 1024 / KILOSTEP
  c.optimizer.weight_decay = 0.0153 / 11.5  # airbench's wd / lr (see above)
  c.optimizer.groups = ("whiten/kernel:frozen", r".*/BatchNorm_\d+/bias:64",
                        r"(whiten/bias|.*/Conv_\d+/kernel|Dense_0/kernel):1")
  # airbench's triangle: 0.2 -> 1 over the first 23% of steps, then down (to 0.07 at the end)
  c.schedule.name = "one_cycle"
  c.schedule.anneal = "linear"
  c.schedule.pct_start = 0.23
  c.schedule.div_factor = 5.0
  c.schedule.final_div_factor = 0.2 / 0.07
  return c
