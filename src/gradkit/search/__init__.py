"""Black-box population search over tensors (ask/tell).

``es = gk.search.CMAES(x0, sigma0, seed=0)``; loop ``x = es.ask()`` -> evaluate ``f`` on the rows ->
``es.tell(x, fx)``; ``es.best``, ``es.stop()``, ``es.state_dict()``. Or ``gk.search.minimize(f, x0, sigma0)``.
Searching a model: :class:`ParamVector` (all weights as one flat vector) and
:class:`spaces.LoRASingularValues` (the singular values of low-rank adapters, ESSA's search space).
"""

from . import functions, mean_optim, shaping, spaces
from .base import Searcher
from .cem import CEM
from .cmaes import CMAES
from .minimize import SearchResult, minimize
from .openai_es import OpenAIES
from .param_vector import ParamVector
from .pgpe import PGPE
from .sep_cmaes import SepCMAES
from .snes import SNES

__all__ = ["CEM", "CMAES", "PGPE", "SNES", "OpenAIES", "ParamVector", "SearchResult", "Searcher", "SepCMAES",
           "functions", "mean_optim", "minimize",
           "shaping", "spaces"]
