"""The optimizer contract tests read each optimizer's capability table (``gk.optim.capabilities()``) and feed it
accordingly (e.g. graph-carrying gradients for ``needs_graph`` optimizers such as AdaHessian, see
``tests.helpers.feed_grads``), so no test skips an optimizer by name."""
