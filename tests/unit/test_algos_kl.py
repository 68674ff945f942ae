import pytest

from rlhf_cluster.algos.kl_controllers import KL_CONTROLLERS, AdaptiveKLController, FixedKLController


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(current_kl=100.0, n_steps=1000)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_controller_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=256)  # e = clip(0.5) = 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=6.6, n_steps=100)  # e = 0.1
    assert c.value == pytest.approx(0.1 * 1.001)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=0.0, n_steps=500)  # e = clip(-1) = -0.2
    assert c.value == pytest.approx(0.1 * 0.99)


def test_adaptive_controller_vs_loop():
    kls = [0.5, 3.0, 12.0, 5.9, 6.1, 0.0, 100.0]
    c = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    value = 0.2
    for kl in kls:
        c.update(kl, n_steps=64)
        e = kl / 6.0 - 1
        e = 0.2 if e > 0.2 else (-0.2 if e < -0.2 else e)
        value = value * (1 + e * 64 / 1000)
        assert c.value == pytest.approx(value)
    c2 = AdaptiveKLController(1.0, target=6.0, horizon=1000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


BAD = [dict(target=0.0, horizon=10), dict(target=1.0, horizon=0), dict(target=-1.0, horizon=10)]


@pytest.mark.parametrize("kwargs", BAD)
def test_adaptive_controller_validation(kwargs):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, **kwargs)


def test_registry():
    assert KL_CONTROLLERS == {"fixed": FixedKLController, "adaptive": AdaptiveKLController}
