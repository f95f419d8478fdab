"""Independent reference: a dense full nodal analysis of one crossbar tile (numpy, float64).

Written from Kirchhoff's current law node by node, without the algebra the library uses,
so that agreement is evidence and not a tautology.
"""
import numpy as np


def nodal_currents(G, V, r_source, r_sink):
    """Column currents (A) of one tile. G: (rows, cols) S; V: (batch, rows) V; returns (batch, cols).

    Unknowns are the row-node and column-node voltages. A zero resistance turns the node into
    a fixed potential (the source voltage, or ground), which is handled by substitution.
    """
    G = np.asarray(G, dtype=np.float64)
    V = np.atleast_2d(np.asarray(V, dtype=np.float64))
    rows, cols = G.shape
    out = np.zeros((V.shape[0], cols))
    for n, v in enumerate(V):
        # node index: rows 0..rows-1, columns rows..rows+cols-1
        N = rows + cols
        Y = np.zeros((N, N))
        J = np.zeros(N)
        fixed = {}
        for i in range(rows):
            if r_source == 0:
                fixed[i] = v[i]
            else:
                Y[i, i] += 1.0 / r_source
                J[i] += v[i] / r_source
        for j in range(cols):
            if r_sink == 0:
                fixed[rows + j] = 0.0
            else:
                Y[rows + j, rows + j] += 1.0 / r_sink
        for i in range(rows):
            for j in range(cols):
                g = G[i, j]
                p, q = i, rows + j
                Y[p, p] += g
                Y[q, q] += g
                Y[p, q] -= g
                Y[q, p] -= g
        free = [k for k in range(N) if k not in fixed]
        x = np.zeros(N)
        for k, val in fixed.items():
            x[k] = val
        if free:
            fixed_idx = list(fixed)
            rhs = J[free] - (Y[np.ix_(free, fixed_idx)] @ x[fixed_idx] if fixed_idx else 0.0)
            x[free] = np.linalg.solve(Y[np.ix_(free, free)], rhs)
        if r_sink == 0:
            # current into ground through each column = sum of cell currents
            out[n] = (G * (x[:rows, None] - 0.0)).sum(0)
        else:
            out[n] = x[rows:] / r_sink
    return out
