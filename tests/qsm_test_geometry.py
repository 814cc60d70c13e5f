"""Rotation and affine helpers shared by the geometry tests (tests/ is on the path through pytest's pythonpath setting)."""

import math

import numpy as np


def rot(axis, deg):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def affine(R, vs, t=(0, 0, 0)):
    A = np.eye(4)
    A[:3, :3] = np.asarray(R) @ np.diag(vs)
    A[:3, 3] = t
    return A
