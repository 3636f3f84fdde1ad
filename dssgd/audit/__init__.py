"""``dssgd audit``: what a curious server or participant learns from one participant's update.

In-process and without servers, through the project's own training, selection and clipping
(shared/selection.py), DP mechanisms (shared/privacy.py, shared/dpsgd.py, shared/accounting.py)
and wire codec (shared/wire.py). Pure attack maths live in small modules:

* ``reconstruct`` — first-layer analytic reconstruction (∂L/∂W_k ÷ ∂L/∂b_k) and its controls;
* ``membership`` — per-update membership scores, AUC, TPR at low FPR, bootstrap intervals;
* ``labels`` — the label set from the signs of the last-layer bias update;
* ``dpcheck`` — the DP mechanism self-test of shared/dpaudit.py at the audited settings;
* ``scenario`` / ``pipeline`` — the data, model states and the server's view of an update;
* ``sweep`` — the grid of settings and one audit per point; ``report`` — table, JSON, PNG.

docs/AUDIT.md has a real output, how to read it and what it cannot show. This package file
imports nothing heavy: ``dssgd --help`` loads ``options`` only.
"""
