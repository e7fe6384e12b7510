"""Expressiveness: environments that 3-body descriptors cannot tell apart (Pozdnyakov et al., PRL 125, 166001, 2020).

HIP-NN-TS builds its invariants from norms |Σ_j w_j T_l(r̂_j)|² = Σ_jk w_j w_k P_l(cos θ_jk), so the
central atom's output depends on its environment only through the multisets of distances and of
(r_j, r_k, θ_jk) triples: it is a 3-body descriptor. HIP-HOP-NN's invariants of degree 3 and 4 (vQv,
tr Q³, |Qv|², ...) are 4- and 5-body and can separate such pairs.

The pair below is built on the principle of Pozdnyakov et al.'s degenerate environments (4 neighbours
on one sphere, equal 2- and 3-body correlations, different 4-body ones), from a homometric pair of
octagon vertices; the coordinates are ours, not copied from the paper. Findings: HIP-NN and HIP-NN-TS
(l_max 2 or 3) give the central atom identical outputs (to 1e-16), HIP-HOP with n_max=2 does too (its
invariants s, v·v, Q:Q, T:T are 3-body), and HIP-HOP with n_max=3 or 4 separates the pair (outputs
differ by about 1e-2 on the tiny test models).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms

from polyfid.models.graph import graph_from_atoms
from polyfid.models.testing import tiny_potential

pytestmark = pytest.mark.usefixtures("one_thread")

# Two 4-point subsets of the 8 vertices of a regular octagon, a homometric pair: their multisets of
# cyclic separations are both {1, 1, 2, 3, 3, 4} (in units of 2π/8), but no rotation or reflection
# of the octagon maps one onto the other ({0, 1, 2} are three consecutive vertices, which {0, 1, 3, 4}
# lacks). Placed on a circle of latitude of a sphere around a central atom, the angle between two
# neighbours depends only on their separation on the circle, so both environments have the same
# neighbour distances and the same multiset of angles: equal 2- and 3-body correlations. Their
# 4-body correlations (triangles of neighbours) differ: {0, 1, 2, 5} holds the triangle of
# separations (1, 1, 2), {0, 1, 3, 4} does not.
PAIR = ((0, 1, 2, 5), (0, 1, 3, 4))
RADIUS = 1.5  # Å, centre to neighbour
POLAR = np.deg2rad(70.0)  # latitude of the circle: neither planar (90°) nor a single point (0°)


def _environment(vertices: tuple[int, ...]) -> Atoms:
    """A carbon atom at the origin with hydrogen neighbours at the given octagon vertices."""
    phi = 2.0 * np.pi * np.asarray(vertices) / 8.0
    ring = RADIUS * np.stack(
        [np.sin(POLAR) * np.cos(phi), np.sin(POLAR) * np.sin(phi), np.full_like(phi, np.cos(POLAR))], axis=1
    )
    return Atoms("C" + "H" * len(vertices), positions=np.vstack([np.zeros(3), ring]))


def _three_body(atoms: Atoms) -> tuple[list[float], list[tuple[float, float, float]]]:
    """Sorted neighbour distances and sorted (r_j, r_k, cos θ_jk) triples of atom 0, rounded to 1e-9."""
    vec = atoms.positions[1:] - atoms.positions[0]
    r = np.linalg.norm(vec, axis=1)
    triples = []
    for j, k in itertools.combinations(range(len(vec)), 2):
        rj, rk = sorted((r[j], r[k]))
        triples.append(tuple(round(float(x), 9) for x in (rj, rk, vec[j] @ vec[k] / (r[j] * r[k]))))
    return sorted(round(float(x), 9) for x in r), sorted(triples)


def _centre_output(model, atoms: Atoms) -> np.ndarray:
    """Per-fidelity energy contributions of the central atom (atom 0)."""
    graph = graph_from_atoms([atoms], model.config.cutoff, dtype=torch.float64)
    with torch.no_grad():
        return model.atom_energies(graph, graph.pos)[0].numpy()


def test_pair_is_degenerate_at_three_body_but_not_congruent():
    a, b = (_environment(v) for v in PAIR)
    assert _three_body(a) == _three_body(b)
    # Not the same environment: the sorted neighbour-neighbour distances of triangles differ.
    def triangles(atoms):
        d = atoms.get_all_distances()[1:, 1:]
        return sorted(tuple(sorted(round(d[x, y], 9) for x, y in itertools.combinations(t, 2)))
                      for t in itertools.combinations(range(4), 3))
    assert triangles(a) != triangles(b)


# One interaction layer: the central atom's output is then a function of its own environment only.
# With two or more layers the neighbours' features enter, and the neighbours of the two structures
# see different neighbour-neighbour distances, which would separate the pair for any kind.
@pytest.mark.parametrize("kind,l_max", [("hipnn", 2), ("hipnn_ts", 2), ("hipnn_ts", 3)])
def test_three_body_kinds_cannot_separate(kind, l_max):
    model = tiny_potential(kind, n_interactions=1, l_max=l_max, cutoff=4.0)
    a, b = (_centre_output(model, _environment(v)) for v in PAIR)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * max(1.0, np.abs(a).max()))


@pytest.mark.parametrize("l_max", [2, 3])
def test_hiphop_n_max_4_separates(l_max):
    model = tiny_potential("hiphop", n_interactions=1, l_max=l_max, n_max=4, cutoff=4.0)
    a, b = (_centre_output(model, _environment(v)) for v in PAIR)
    assert np.abs(a - b).max() > 1e-4, (a, b)


def test_hiphop_two_body_invariants_cannot_separate():
    """HIP-HOP with n_max=2 has only s, v·v, Q:Q, T:T: 3-body, like HIP-NN-TS, so the pair stays equal."""
    model = tiny_potential("hiphop", n_interactions=1, l_max=3, n_max=2, cutoff=4.0)
    a, b = (_centre_output(model, _environment(v)) for v in PAIR)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * max(1.0, np.abs(a).max()))
