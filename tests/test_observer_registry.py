"""The observer registry: every observer is found by name, and a new one needs only its module.

Each registered name builds through ``make_observer`` and calibrates; a duplicate name or a
non-Observer class is refused; an unknown name's error lists the registered ones and how to
register; an observer registered here (and unregistered afterwards) is accepted by the
qconfig loader, built by ``make_observer``, merged across processes through its parent's
merge and used by ``fxquant.compile``.
"""

from __future__ import annotations

import pytest
import timm
import torch
from tiny import TINY_VIT, images

import fxquant
from fxquant.errors import QConfigError
from fxquant.quant import distributed
from fxquant.quant.observers import (
    MinMaxObserver,
    ObserverError,
    make_observer,
    observer_class,
    register_observer,
    registered_observers,
    unregister_observer,
)
from fxquant.quant.qconfig import load_qconfig
from fxquant.quant.quantizers import fake_quantize
from fxquant.quant.spec import QuantSpec

BUILT_IN = ("ema", "kl", "minmax", "omse", "percentile", "ptf")


def test_the_built_in_observers_are_registered_under_their_names():
    assert set(BUILT_IN) <= set(registered_observers())
    assert list(registered_observers()) == sorted(registered_observers())
    assert observer_class("minmax") is MinMaxObserver and MinMaxObserver.registered_name == "minmax"


@pytest.mark.parametrize("name", registered_observers())
def test_every_registered_observer_builds_from_a_spec_and_calibrates(name):
    # channel_wise: the one granularity every observer serves (PTF serves only it)
    # (kl_bins: a histogram that this little data fills; other observers ignore the option)
    spec = QuantSpec(bits=8, signed=True, granularity="channel_wise", observer=name, options={"kl_bins": 256})
    observer = make_observer(spec, axis=-1, name=f"point_{name}")
    assert type(observer) is observer_class(name) and observer.name == f"point_{name}"
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for _ in range(3):
        observer.update(torch.randn(32, 64, 4, generator=gen) * scales)
    assert observer.num_updates == 3
    qp = observer.compute_qparams()
    assert qp.axis == -1 and qp.scale.shape == (4,)
    assert bool((qp.scale > 0).all()) and bool(torch.isfinite(qp.scale).all())
    # each channel's grid follows that channel's spread (PTF's in powers of two of one scale)
    assert bool((qp.scale[1:] >= qp.scale[:-1]).all()) and qp.scale[-1] > 2 * qp.scale[0], qp.scale
    x = torch.randn(32, 64, 4, generator=gen) * scales
    err = (fake_quantize(x, qp) - x).pow(2).mean() / x.pow(2).mean()
    assert err < 1e-2, f"{name}: relative squared error {err:.3g}"


def test_a_duplicate_name_a_bad_name_and_a_non_observer_are_refused():
    class Another(MinMaxObserver):
        pass

    with pytest.raises(ValueError, match=r"'minmax' is already registered for .*MinMaxObserver.*Another"):
        register_observer("minmax")(Another)
    assert observer_class("minmax") is MinMaxObserver
    with pytest.raises(TypeError, match="not a subclass of fxquant.quant.observers.Observer"):
        register_observer("not_a_class")(dict)
    for bad in ("MinMax", "", "2bit", "fooobserver", None):
        with pytest.raises(ValueError, match="is not allowed"):
            register_observer(bad)
    assert "not_a_class" not in registered_observers()


def test_an_unknown_name_lists_the_registered_ones_and_how_to_register():
    with pytest.raises(ObserverError) as info:
        make_observer(QuantSpec(observer="nope"), name="blocks.0.norm1")
    message = str(info.value)
    assert "'nope'" in message and "register_observer" in message
    for name in BUILT_IN:
        assert name in message
    with pytest.raises(ObserverError, match="no observer is registered as 'nope'"):
        unregister_observer("nope")


class ToyObserver(MinMaxObserver):
    """Symmetric range from the largest magnitude seen; refuses log2 grids. Counts its builds."""

    built: list[str] = []

    @classmethod
    def check_spec(cls, spec):
        if spec.method != "uniform":
            raise ValueError("ToyObserver needs quantization_method uniform")

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        ToyObserver.built.append(self.name)

    def _range(self):
        top = torch.maximum(-self.min, self.max)
        return -top, top


@pytest.fixture
def toy():
    ToyObserver.built = []
    register_observer("toy")(ToyObserver)
    yield ToyObserver
    if "toy" in registered_observers():
        unregister_observer("toy")


def test_a_registered_observer_is_usable_from_a_qconfig_dict(toy):
    config = load_qconfig({"name": "toy", "attn_q_out": {"observer_type": "ToyObserver", "bits": 8, "signed": False}})
    spec = config.spec_for("attn_q_out", "act")
    assert spec.observer == "toy"
    assert load_qconfig({"mlp_gelu": {"observer": "TOY"}}).spec_for("mlp_gelu", "act").observer == "toy"
    observer = make_observer(spec, name="blocks.0.attn.q")
    assert isinstance(observer, toy) and toy.built == ["blocks.0.attn.q"]
    observer.update(torch.tensor([-1.0, 0.5, 3.0]))
    qp = observer.compute_qparams()
    # unsigned affine grid over the toy's symmetric [-3, 3]: 255 steps of 6/255
    assert torch.isclose(qp.scale, torch.tensor(6.0 / 255))
    assert distributed.merge_for(toy) is distributed.merge_for(MinMaxObserver)  # inherited merge
    # its own check_spec speaks through the loader, naming the key path
    with pytest.raises(QConfigError, match=r"<dict>: mlp_gelu: ToyObserver needs quantization_method uniform"):
        load_qconfig({"mlp_gelu": {"observer_type": "toy", "quantization_method": "log2"}})
    with pytest.raises(ValueError, match="ToyObserver needs"):
        make_observer(QuantSpec(observer="toy", method="log2"))
    # unregistered, the loader refuses the name again and lists what is registered
    unregister_observer("toy")
    with pytest.raises(
        QConfigError, match=r"attn_q_out.observer_type: 'ToyObserver' is not allowed; allowed: .*Minmax"
    ):
        load_qconfig({"attn_q_out": {"observer_type": "ToyObserver"}})


def test_compile_uses_a_registered_observer_named_in_a_qconfig(toy):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    qconfig = {"extends": "w8a8", "mlp_gelu": {"observer_type": "ToyObserver"}}
    qm = fxquant.compile(model, qconfig, calib_data=images(4, 32), progress=False)
    assert sorted(toy.built) == ["blocks_0_mlp_act (mlp_gelu)", "blocks_1_mlp_act (mlp_gelu)"], toy.built
    x = images(2, 32, seed=2)
    with torch.no_grad():
        assert torch.isfinite(qm(x)).all()
