"""Converted weights give torch's outputs, without torch: each case's seeded weights
(``tests/parity.py``) through ``weights.variables_from_state_dict`` into the flax model,
against the logits and pre-classifier features torch computed for them
(``tests/references``, written by ``python -m tests.make_references``). With torch installed,
``test_parity_torch.py`` also compares live, stage by stage."""
import numpy as np
import pytest

from cnnjax import weights
from tests import parity

# float32 rounding grows with the magnitudes (logits reach ~30 here): the tolerances are
# fractions of the largest value, logits at least 1e-4 as in the live tests.
LOGIT_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 2e-5
BOTTLENECK_TOLERANCE = 8e-5  # ResNet-50's 16 bottleneck blocks (measured: 4.0e-5)


@pytest.mark.parametrize("name", [n if n in ("resnet18", "resnet18_cifar")
                                  else pytest.param(n, marks=pytest.mark.slow) for n in parity.CASES])
def test_converted_weights_give_torchs_logits(name):
  ref = parity.reference(name)
  model = parity.flax_model(name)
  size = parity.CASES[name].size
  variables = weights.variables_from_state_dict(ref["state_dict"], parity.CASES[name].model_name,
                                                model, input_shape=(1, size, size, 3))
  logits, seen = parity.flax_outputs(model, variables, parity.case_input(name))
  relative = BOTTLENECK_TOLERANCE if name == "resnet50" else RELATIVE_TOLERANCE
  scale = np.abs(ref["features"]).max()
  np.testing.assert_allclose(seen["features"].reshape(ref["features"].shape), ref["features"],
                             rtol=0, atol=relative * scale)
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=max(
      LOGIT_TOLERANCE, relative * np.abs(ref["logits"]).max()))
  assert np.abs(ref["logits"]).max() > 0.1  # not a trivially small comparison


def test_a_changed_weight_is_caught():
  ref = parity.reference("resnet18_cifar")
  ref["state_dict"]["layer3.0.conv1.weight"] = ref["state_dict"]["layer3.0.conv1.weight"] * 1.01
  model = parity.flax_model("resnet18_cifar")
  variables = weights.variables_from_state_dict(ref["state_dict"], "resnet18", model,
                                                input_shape=(1, 32, 32, 3))
  logits, _ = parity.flax_outputs(model, variables, parity.case_input("resnet18_cifar"))
  assert np.abs(logits - ref["logits"]).max() > 10 * LOGIT_TOLERANCE
