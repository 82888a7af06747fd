"""The course's first CIFAR-10 study in a few lines: SeedCNN, RMSprop 1e-3, batch 128, 3 epochs.

  python examples/cifar_seed.py [DATA]   # DATA: 'cifar10' (TFDS) or a local .npz, e.g.
                                          # ../shared/data/cifar10.npz
Same seed, same splits, same loop as `experiments/configs/cifar_seed.py`: same accuracy.
Writes its curves to runs/cifar_seed_example/curves.png.
"""
import sys

import cnnjax

data = sys.argv[1] if len(sys.argv) > 1 else "cifar10"
learner = cnnjax.Learner("seed_cnn", data, optimizer="rmsprop", lr=1e-3, batch_size=128, val_size=0.2)
history = learner.fit(epochs=3)
history.plot("runs/cifar_seed_example/curves.png")
print(learner.evaluate())
