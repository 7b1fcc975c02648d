import pytest
import torch

import gradkit as gk
from gradkit.models import train_digits
from tests.helpers import assert_parity, assert_state_dict_roundtrip, make_params, two_groups

MATS = ((48, 96), (96, 48), (48, 96), (96, 48))  # equal sizes: block mode's subset size is then ∝ density


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _stepped(proj, density, steps=3):
    ps = make_params(MATS)
    opt = gk.optim.FRUGAL(ps, density=density, proj=proj, kernel="foreach")
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("proj", ["svd", "random", "block"])
def test_state_bytes_are_proportional_to_the_subspace(proj):
    adam_bytes = 2 * sum(a * b for a, b in MATS) * 4
    small, large = state_bytes(_stepped(proj, 0.25)), state_bytes(_stepped(proj, 0.5))
    # svd/random: r·(2·cols + rows) floats per matrix with r = density·48; block: density·N whole matrices.
    assert large == 2 * small, (small, large)
    expected_small = adam_bytes / 4 if proj == "block" else 4 * 12 * (2 * 96 + 48) * 4
    assert small == expected_small, (small, expected_small)
    assert small < adam_bytes / 3


def test_block_mode_at_full_density_is_adamw(kernel):
    def ours(ps):
        return gk.optim.FRUGAL(two_groups(ps, lr=3e-3, weight_decay=0.2), lr=1e-2, weight_decay=0.05,
                               density=1.0, proj="block", kernel=kernel)

    def ref(ps):
        return torch.optim.AdamW(two_groups(ps, lr=3e-3, weight_decay=0.2), lr=1e-2, weight_decay=0.05)

    assert_parity(ours, ref)


def test_first_step_splits_into_projected_adam_and_sign_of_the_residual():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 20, generator=gen)
    p = torch.zeros(8, 20, requires_grad=True)
    opt = gk.optim.FRUGAL([p], lr=0.1, density=0.25, eps=1e-12, kernel="loop")
    p.grad = g.clone()
    opt.step()
    P = torch.linalg.svd(g, full_matrices=False)[0][:, :2]
    low = P.T @ g
    # First Adam step: m̂/(√v̂ + ε) = sign(g_s) (ε negligible).
    expected = -0.1 * (P @ low.sign() + (g - P @ low).sign())
    torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=0)
    assert opt.state[p]["exp_avg"].shape == (2, 20) and opt.state[p]["projector"].shape == (8, 2)


def test_subspace_refreshes_every_update_gap_steps_and_resets_state():
    ps = make_params(((16, 24),))
    opt = gk.optim.FRUGAL(ps, density=0.25, update_gap=3, kernel="foreach")
    projs = []
    for t in range(7):
        ps[0].grad = torch.randn_like(ps[0])
        opt.step()
        projs.append(opt.state[ps[0]]["projector"].clone())
        assert opt.state[ps[0]]["adam_step"] == t % 3 + 1
    assert torch.equal(projs[0], projs[2]) and not torch.equal(projs[2], projs[3])
    assert torch.equal(projs[3], projs[5]) and not torch.equal(projs[5], projs[6])


@pytest.mark.parametrize("proj", ["svd", "random", "block"])
def test_frugal_state_dict_roundtrip(proj):
    assert_state_dict_roundtrip(lambda ps: gk.optim.FRUGAL(two_groups(ps, lr=1e-3), lr=1e-2, weight_decay=0.1,
                                                           proj=proj, update_gap=30, kernel="foreach"))


def test_frugal_state_dict_roundtrip_every_kernel(kernel):
    assert_state_dict_roundtrip(lambda ps: gk.optim.FRUGAL(ps, lr=1e-2, update_gap=30, kernel=kernel))


def test_digits_accuracy_within_one_point_of_adamw():
    adamw = train_digits(lambda m: gk.optim.AdamW(m.parameters(), lr=3e-3, kernel="foreach"), steps=300).final
    frugal = train_digits(lambda m: gk.optim.FRUGAL(m.parameters(), lr=3e-3, kernel="foreach"), steps=300).final
    assert adamw > 0.9 and abs(frugal - adamw) <= 0.01, (frugal, adamw)


@pytest.mark.parametrize("arg,value", [("density", 0.0), ("density", 1.5), ("proj", "pca"), ("update_gap", 0),
                                       ("free_lr", -1.0), ("seed", -3)])
def test_frugal_bad_input_names_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        gk.optim.FRUGAL(make_params(), **{arg: value}, kernel="foreach")
