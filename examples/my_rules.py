"""A selection rule and an update rule of your own, named on the command line:

    dssgd run --selection examples/my_rules.py:Signs --rule examples/my_rules.py:Halved --epochs 10

A selection rule has ``select(delta, k, tau, rng) -> indices`` (at most k, into Δw); an update
rule has ``weight(staleness, exponent, n_participants) -> float``. ``help`` is the line shown.
"""

import numpy as np


class Signs:
    help = "the k largest |Δw| among the entries whose sign agrees with the majority"

    def select(self, delta, k, tau, rng):
        majority = np.sign(delta.sum()) or 1.0
        agree = np.flatnonzero(np.sign(delta) == majority)
        top = agree[np.argsort(-np.abs(delta[agree]))[:k]]
        return np.sort(top)


class Halved:
    help = "half of FedAsync's staleness weight"

    def weight(self, staleness, exponent, n_participants):
        return 0.5 * (1.0 + max(0, staleness)) ** -exponent
