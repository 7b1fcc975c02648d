"""Optimizers that declare ``needs_graph = True`` (second-order methods such as AdaHessian) differentiate through
``p.grad``, so the contract tests that feed plain, graph-less gradients cannot step them. Those tests are
skipped for such classes, with the reason; each such optimizer's own test file runs the same checks with
gradients from ``backward(create_graph=True)`` (e.g. tests/optim/test_adahessian.py)."""

import pytest

_PLAIN_GRADIENT_TESTS = {
    "test_nonfinite_gradient_leaves_everything_untouched",
    "test_works_with_torch_lr_scheduler_and_zero_grad",
    "test_step_with_closure_returns_loss",
    "test_parameters_without_grad_are_untouched",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name != "test_contract.py" or item.originalname not in _PLAIN_GRADIENT_TESTS:
            continue
        cls = getattr(item, "callspec", None) and item.callspec.params.get("cls")
        if getattr(cls, "needs_graph", False):
            item.add_marker(pytest.mark.skip(
                reason=f"{cls.__name__} needs gradients with a graph (create_graph=True); this contract check "
                       f"runs with graph gradients in its own test file"))
