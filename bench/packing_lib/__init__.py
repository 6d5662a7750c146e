"""Packing-quality harness: replay of the Alibaba GPU trace (FGD methodology) and a CP-SAT check.

Kept out of ``shared/``: this is benchmark code. Placement decisions of Gantry's own strategies come
from the placement core's scorer plugins; the baselines of the FGD paper are implemented here.
"""
