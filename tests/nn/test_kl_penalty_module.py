"""fastft.nn.KLPenalty validates its coefficient as the ops validate theirs."""
import math

import pytest
import torch

from fastft.nn import KLPenalty


@pytest.mark.parametrize("coef", [math.nan, math.inf, -math.inf])
def test_non_finite_coef_raises(coef):
    with pytest.raises(ValueError, match="coef must be a finite number"):
        KLPenalty(coef)


@pytest.mark.parametrize("coef", [True, "0.1"])
def test_non_number_coef_raises(coef):
    with pytest.raises(TypeError, match="coef must be a Python number"):
        KLPenalty(coef)


def test_tensor_coef_is_taken_as_its_value():
    logprobs, ref_logprobs = torch.randn(2, 5), torch.randn(2, 5)
    expected = KLPenalty(0.25)(logprobs, ref_logprobs)
    torch.testing.assert_close(KLPenalty(torch.tensor(0.25))(logprobs, ref_logprobs), expected)
